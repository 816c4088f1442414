"""The Python API's entry points: `taps_cl.open_registry` and the one-call `taps_cl.restore`.

Both open a `Manager` (taps_cl.manager), which does the work; like it, importing this module does
not import torch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from taps_cl.manager import Manager

if TYPE_CHECKING:
    from torch import nn


def restore(
    name: str, home: str | os.PathLike[str] | None = None, db_url: Optional[str] = None,
    artifacts_url: Optional[str] = None,
) -> nn.Module:
    """Task ``name``'s model (the Python API of ``taps-cl restore``): the base's timm/torchvision
    class, plain for methods that fold into its weights, with attached modules for adapters."""
    with Manager(home, db_url, artifacts_url) as manager:
        return manager.restore(name)


def open_registry(
    home: str | os.PathLike[str] | None = None, db: Optional[str] = None,
    artifacts: Optional[str] = None,
) -> Manager:
    """The registry at `home` (default ``$TAPS_CL_HOME`` or ``./.taps-cl``) or database URL `db`,
    with the artifact store `artifacts` (default: the one the registry recorded).

    Use it as a context manager, or call ``close()`` when done.
    """
    return Manager(home, db, artifacts)


__all__ = ["open_registry", "restore"]
