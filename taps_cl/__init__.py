"""taps-cl: continual multi-task learning on one frozen backbone."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Manager", "load_file", "open_registry", "restore", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import taps_cl.errors` (and the CLI's --help) need not import torch.
    if name == "Manager":
        from taps_cl.manager import Manager

        return Manager
    if name in ("open_registry", "restore"):
        import taps_cl.api as api

        return getattr(api, name)
    if name == "load_file":
        from taps_cl.models.files import load_file

        return load_file
    raise AttributeError(f"module 'taps_cl' has no attribute {name!r}")
