"""Task-learning methods, registered by name (`get_method("taps", lam=0.3)`).

Importing a method's module registers it; a new method module is added to the imports below.
"""

from taps_cl.methods import (  # noqa: F401  (registers the methods)
    adapter,
    finetune,
    fusion,
    linear,
    progressive,
    taps,
)
from taps_cl.methods.base import (
    METHODS,
    Dependency,
    LayerRecord,
    Method,
    TaskState,
    adaptable_layers,
    build_composed,
    get_method,
    merge_state,
    norm_layers,
    register,
)

__all__ = [
    "METHODS",
    "Dependency",
    "LayerRecord",
    "Method",
    "TaskState",
    "adaptable_layers",
    "build_composed",
    "get_method",
    "merge_state",
    "norm_layers",
    "register",
]
