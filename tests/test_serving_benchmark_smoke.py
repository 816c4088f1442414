"""Smoke test of benchmarks/serving.py: a small run gives every figure, and they hold together."""

from __future__ import annotations

import json
import math

from benchmarks import serving

FIGURES = ("mt_bytes", "restored_bytes", "budget_numbers", "all_tasks_mt_img_s",
           "all_tasks_restored_img_s", "mixed_img_s", "single_img_s", "grouped_img_s",
           "all_speedup", "mixed_vs_single", "plan_saving")


def test_quick_run_measures_every_row_and_size(tmp_path, capsys, one_thread):
    rows = "prog=progressive:group=auto;lora=lora:rank=2,norms=affine"
    assert serving.main(["--quick", "--rows", rows, "--sizes", "1,2", "--repeat", "1",
                         "--batch", "4", "--home", str(tmp_path / "home"), "--json"]) == 0
    out, err = capsys.readouterr()
    results = json.loads(out)  # stdout is one JSON document; progress went to stderr
    assert "added" in err
    assert [(r["row"], r["n"]) for r in results] == [("prog", 1), ("prog", 2), ("lora", 1),
                                                     ("lora", 2)]
    for r in results:
        for key in FIGURES:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, \
                (key, r)
        # The multi-task model computes what the restored models compute...
        assert r["max_abs_diff"] < 1e-3, r
        # ...and holds no more than what the registry says the tasks store (base + own tensors
        # + shared bands), not N whole models. It may hold less: a full delta folded into its
        # weight frees the base's copy of that weight when no served task computes the base's.
        assert r["mt_vs_budget"] < 1.1, r
    prog1, prog2 = results[0], results[1]
    assert 0.9 < prog1["mt_vs_budget"] < 1.1 and 0.9 < prog2["mt_vs_budget"] < 1.1
    assert prog2["restored_bytes"] > 1.9 * prog1["restored_bytes"]
    assert prog2["mt_bytes"] < 1.3 * prog1["mt_bytes"]  # the second task shares the bands
    assert prog2["plan_saving"] > 1.0  # two progressive tasks share their first stages
    lora = results[3]
    assert "peft_mixed_img_s" in lora  # PEFT's mixed-adapter batch ran, or says why not
    assert lora["peft_mixed_img_s"] is not None or lora["peft_note"]
