"""``yacs.config.CfgNode`` for tests that write official-format checkpoints: the real class when yacs is
installed, else a stand-in registered under the same module name (pickle writes that name, which is all the
reader sees). Like the real one it is a dict subclass with its flags in ``__dict__``."""

from __future__ import annotations

import sys
import types

try:
    from yacs.config import CfgNode
except ImportError:

    class CfgNode(dict):  # type: ignore[no-redef]
        def __init__(self, init: dict | None = None) -> None:
            super().__init__(init or {})
            self.__dict__.update(
                __immutable__=False, __deprecated_keys__=set(), __renamed_keys__={}, __new_allowed__=False
            )

    CfgNode.__module__ = "yacs.config"
    _pkg, _mod = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    _mod.CfgNode, _pkg.config = CfgNode, _mod
    sys.modules.setdefault("yacs", _pkg)
    sys.modules.setdefault("yacs.config", _mod)
