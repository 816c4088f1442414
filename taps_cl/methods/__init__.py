"""Task-learning methods, registered by name (`get_method("taps", lam=0.3)`).

Importing a method's module registers it; a new method module is added to the imports below.
"""

from taps_cl.methods.base import (
    METHODS,
    LayerRecord,
    Method,
    TaskState,
    adaptable_layers,
    get_method,
    merge_state,
    norm_layers,
    register,
)
from taps_cl.methods import finetune, linear, taps  # noqa: F401  (registers the methods)

__all__ = [
    "METHODS",
    "LayerRecord",
    "Method",
    "TaskState",
    "adaptable_layers",
    "get_method",
    "merge_state",
    "norm_layers",
    "register",
]
