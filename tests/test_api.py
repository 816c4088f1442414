"""The README's Python example runs as printed and its reports say what they should."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from taps_cl.analysis import reports

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "# example: python-api"


def readme_example() -> str:
    """The ```python block of README.md that contains the marker line."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    found = [b for b in blocks if MARKER in b.splitlines()]
    assert len(found) == 1, f"expected one python block with {MARKER!r} in README.md"
    return found[0]


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its mkdtemp lands in tmp_path
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(readme_example(), str(README), "exec"), namespace)

    home = Path(namespace["home"])
    assert home.parent == tmp_path and (home / "registry.db").is_file()
    budget = namespace["budget"]
    assert isinstance(budget, reports.BudgetReport)
    assert [row.name for row in budget.tasks] == ["digits"]
    row = budget.tasks[0]
    assert row.method == "linear" and row.task_params > 0 and row.bytes > 0
    assert row.budget is None and row.budget_used is None
    assert budget.total_params == budget.base_params + row.task_params
    assert budget.ratio_to_base > 1 and 0 < row.ratio_to_base < 1
    # A linear probe stores just its head: as much as one fine-tuned model's head on the base.
    assert row.head_params == row.task_params
    assert budget.linear_total_params == budget.finetune_total_params == budget.total_params

    report = namespace["report"]
    assert isinstance(report, reports.AccuracyReport)
    assert report.verified is True and report.problems == ()
    assert report.tasks == ("digits",) and report.complete
    assert report.matrix[0][0] == namespace["added"].test_accuracy
    assert report.to_json()["verified"] is True

    model = namespace["model"]
    assert type(model).__module__.startswith("timm.")
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    out = capsys.readouterr().out
    assert "× base" in out and "True" in out
