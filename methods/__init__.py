"""Method registry. Importing this package registers every method (explicit imports, one line each)."""

# One line per module, in registration order (not sorted): a module missing here never registers its methods,
# which tests/test_methods_contract.py catches.
# ruff: noqa: I001
from methods.base import METHODS, MethodConfig, MethodSpec, register_method  # noqa: F401

from methods import mtlora  # noqa: F401,E402  (mtlora, mtlora_plus)
from methods import tadformer  # noqa: F401,E402  (tadformer, tadformer_release)
from baselines import full_ft  # noqa: F401,E402
from baselines import decoders_only  # noqa: F401,E402
from baselines import single_task  # noqa: F401,E402
from baselines import bitfit  # noqa: F401,E402
from baselines import relative_bias  # noqa: F401,E402
from baselines import vpt  # noqa: F401,E402  (vpt_shallow, vpt_deep)
from baselines import adapter  # noqa: F401,E402
from baselines import lora  # noqa: F401,E402
from baselines import peft_bridge  # noqa: F401,E402  (dora, loha, lokr, ia3, vera, oft)
