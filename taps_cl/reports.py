"""The public import path of the report dataclasses and their plots.

`Manager.budget`, `Manager.accuracy`, `Manager.layer_map` and `Manager.similarity` return these
frozen dataclasses; each has `to_json()` giving the document `taps-cl … --json` prints, and the
`plot_*` functions draw them to a PNG file. They are defined in `taps_cl.analysis.reports` and
`taps_cl.analysis.plots`; code outside the package imports them from here.
"""

from __future__ import annotations

from taps_cl.analysis.plots import plot_accuracy, plot_budget, plot_layers, plot_similarity
from taps_cl.analysis.reports import (
    AccuracyReport,
    BudgetReport,
    BudgetRow,
    LayerMap,
    SimilarityReport,
)

__all__ = [
    "AccuracyReport",
    "BudgetReport",
    "BudgetRow",
    "LayerMap",
    "SimilarityReport",
    "plot_accuracy",
    "plot_budget",
    "plot_layers",
    "plot_similarity",
]
