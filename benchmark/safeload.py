"""Reading ``.pt`` / ``.pth`` files without running anything from them.

Every checkpoint, pretrained file and fixture is read here. ``torch.load(weights_only=True)`` comes first
(tensors, plain containers and numbers). An official MTLoRA training checkpoint also pickles its yacs config
(``yacs.config.CfgNode``, a dict subclass), which that loader refuses; such a file is read again with
:class:`_RestrictedUnpickler`, whose allow-list is exactly what such a checkpoint needs:

- tensors and parameters (``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``, without backward
  hooks), storages (handled by torch's own loader), ``collections.OrderedDict``, ``set`` / ``frozenset``;
- ``yacs.config.CfgNode``, read as :class:`OfficialConfig`: a plain dict of its items; its pickled attributes
  (immutability flags) are dropped;
- numeric numpy scalars (``numpy.dtype`` of kinds b/i/u/f/c, ``numpy.core.multiarray.scalar`` and the
  ``_codecs.encode(..., 'latin1')`` that protocol 2 uses for their bytes).

Anything else (another global, a callable outside this list, ``__setstate__`` of another class, an object
built by ``INST`` / ``OBJ``) stops the read with a :class:`CheckpointError` naming it; nothing in the file is
called. Both the zip format and the legacy (pre-1.6, non-zip) format go through the same two readers.
"""

from __future__ import annotations

import pickle
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (wrong architecture, nothing matched, unreadable)."""


class OfficialConfig(dict):
    """The items of an official checkpoint's yacs ``CfgNode``; inert data."""

    def __setstate__(self, state: Any) -> None:  # the CfgNode's flags: not kept, nothing is run
        pass


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # protocol 2+ pickles (every torch.save since 0.4) start with PROTO


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, *rest: Any):
    if not isinstance(storage, torch.storage.TypedStorage) or hooks or len(rest) > 1:
        raise pickle.UnpicklingError("a tensor with backward hooks or an unexpected storage is not read")
    metadata = rest[0] if rest else None
    if metadata is not None and not (isinstance(metadata, dict) and all(type(v) is bool for v in metadata.values())):
        raise pickle.UnpicklingError("tensor metadata other than flags is not read")
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, bool(requires_grad), OrderedDict(), metadata)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any) -> torch.nn.Parameter:
    if not isinstance(data, torch.Tensor) or hooks:
        raise pickle.UnpicklingError("a parameter with backward hooks is not read")
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


_NUMERIC_KINDS = "biufc"  # bool, int, unsigned, float, complex: numpy scalars of these are plain numbers


def _np_dtype(name: Any, align: Any = False, copy: Any = False) -> np.dtype:
    dtype = np.dtype(name) if isinstance(name, str) and len(name) <= 8 else None
    if dtype is None or dtype.kind not in _NUMERIC_KINDS:
        raise _Refused(f"a numpy dtype {name!r}")
    return dtype


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS or not isinstance(data, bytes):
        raise _Refused("a numpy scalar that is not a number")
    if len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"a numpy {dtype} scalar of {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype)[0]


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:  # how protocol 2 stores bytes (a numpy scalar's)
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("a call of _codecs.encode")
    return text.encode("latin1")


_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # protocol 2 writes Python 3's builtins under their Python 2 module name
    ("__builtin__", "frozenset"): frozenset,
    ("yacs.config", "CfgNode"): OfficialConfig,
    # numeric numpy scalars (e.g. a best accuracy kept as numpy.float64), read as numbers
    ("numpy", "dtype"): _np_dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("_codecs", "encode"): _latin1,
}
_CALLABLE = {_rebuild_tensor, _rebuild_parameter, OrderedDict, set, frozenset, _np_dtype, _np_scalar, _latin1}
_CLASSES = {OfficialConfig, OrderedDict}  # may be created by NEWOBJ and get BUILD (whose state is dropped)


class _Refused(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle._Unpickler):  # the Python implementation: its opcodes can be replaced
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        found = _GLOBALS.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def _reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if func not in _CALLABLE or not isinstance(args, tuple):
            raise _Refused(f"a call of {getattr(func, '__name__', type(func).__name__)}")
        self.stack[-1] = func(*args)

    def _newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls not in _CLASSES or args != ():
            raise _Refused(f"an object of {getattr(cls, '__name__', type(cls).__name__)}")
        self.append(cls.__new__(cls))

    def _build(self) -> None:
        state = self.stack.pop()  # dropped, but for a numpy dtype's byte order
        if isinstance(self.stack[-1], np.dtype):
            if isinstance(state, tuple) and len(state) > 1 and state[1] == ">":
                self.stack[-1] = self.stack[-1].newbyteorder(">")
            return
        if type(self.stack[-1]) not in _CLASSES:
            raise _Refused(f"the state of a {type(self.stack[-1]).__name__}")

    def _refuse(self) -> None:
        raise _Refused("an object built by INST/OBJ/NEWOBJ_EX/EXT")

    dispatch[pickle.REDUCE[0]] = _reduce
    dispatch[pickle.NEWOBJ[0]] = _newobj
    dispatch[pickle.BUILD[0]] = _build
    for _op in (pickle.INST, pickle.OBJ, pickle.NEWOBJ_EX, pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _refuse
    del _op


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


_PICKLE_MODULE = types.SimpleNamespace(
    Unpickler=_RestrictedUnpickler,
    load=_restricted_load,
    UnpicklingError=pickle.UnpicklingError,
    __name__="restricted",
)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    if "Weights only load failed" in text:  # torch's advice to unpickle anyway is not for us: keep the reason
        lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
        reasons = [ln for ln in lines if not ln.startswith(("Please file", "Check the documentation", "Re-running"))]
        text = reasons[0] if reasons else "not a file of plain tensors"
    return (text.splitlines()[0] if text else "") or type(e).__name__


def safe_load(path: str | Path, what: str = "checkpoint") -> Any:
    """The object stored in ``path`` (tensors on the CPU); a :class:`CheckpointError` naming the file and the
    reason when it is empty, not a PyTorch file, damaged, or holds anything outside the allow-list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: file not found")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(
            f"{what} {path}: cannot be read: empty file (0 bytes); expected a PyTorch file (torch.save)"
        )
    if head != _ZIP_MAGIC and head[0] != _PICKLE_PROTO:
        raise CheckpointError(
            f"{what} {path}: cannot be read: not a PyTorch file (neither a zip archive nor the legacy pickle format); "
            "expected a file written by torch.save"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # another object than plain data: the official config, or something refused below
    except Exception as e:  # truncated zip, bad records, ...
        raise CheckpointError(f"{what} {path}: cannot be read (truncated or corrupt?): {_first_line(e)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PICKLE_MODULE)
    except _Refused as e:
        raise CheckpointError(
            f"{what} {path}: cannot be read: it holds {e.args[0]}, which is not allowed (only tensors, plain containers, numbers and "
            "the official yacs config are); nothing from the file was run"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{what} {path}: cannot be read (truncated or corrupt?): {_first_line(e)}") from None
