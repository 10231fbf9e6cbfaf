"""MTLoRA-family methods, one file each: a plug-in package of the method registry.

Each module registers its methods with ``benchmark.method_api.register_method``; the core finds them through
``benchmark.method_api.PLUGINS`` (one line per module), never by importing this package.
"""

from benchmark.method_api import METHODS  # noqa: F401  (the old import path of the registry, which lives in the core)
