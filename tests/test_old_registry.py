"""A registry written by the code before the package was reorganised (commit e113eb4, kept in
tests/fixtures/registry_e113eb4 with the script that made it) opens, verifies, restores and grows
unchanged: the files and rows it holds are a contract."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

import taps_cl
from taps_cl.manager import Manager

FIXTURE = Path(__file__).parent / "fixtures" / "registry_e113eb4"
METHODS = {"lin": "linear", "ft": "finetune", "taps": "taps", "compact": "taps",
           "ad": "adapter", "fu": "fusion", "pa": "progressive", "pb": "progressive"}


def old_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(FIXTURE, home)
    return home


def test_old_registry_verifies_and_restores_every_task(tmp_path):
    home = old_home(tmp_path)
    before = {p.relative_to(home): p.read_bytes() for p in (home / "artifacts").rglob("*")
              if p.is_file()}
    with Manager(home) as m:
        assert {t.name: t.method for t in m.list_tasks()} == METHODS
        report = m.accuracy(verify=True, workers=1)
        assert report.verified, report.problems
        assert report.chain_problems == ()
        for name in METHODS:
            model = m.restore(name)  # refused if the probe logits moved
            probe = m.models.probe(m.get_task(name))
            with torch.no_grad():
                logits = model(probe["inputs"])
            torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-5)
        exported = m.restore_to_file("fu", tmp_path / "fu.safetensors")
    fused = taps_cl.load_file(exported)
    assert fused(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    after = {p.relative_to(home): p.read_bytes() for p in (home / "artifacts").rglob("*")
             if p.is_file()}
    assert after == before  # reading never rewrites a file


def test_old_registry_takes_a_new_task_and_keeps_its_chain(tmp_path):
    home = old_home(tmp_path)
    with Manager(home) as m:
        added = m.add_task("more", "tiny", "digits", method="linear", max_train=64, max_test=32,
                           epochs=1, img_size=32, batch_size=16)
        assert added is not None and added.task.position == len(METHODS) + 1  # positions count from 1
        assert all(check.ok for check in added.probe_checks)
        report = m.accuracy(verify=True, workers=1)
        assert report.verified, report.problems
