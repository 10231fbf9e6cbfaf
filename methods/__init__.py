"""Method registry. Importing this package registers every method (explicit imports, one line each)."""

from methods.base import METHODS, MethodConfig, MethodSpec, register_method  # noqa: F401

from methods import mtlora  # noqa: F401,E402  (mtlora, mtlora_plus)
from baselines import full_ft  # noqa: F401,E402
