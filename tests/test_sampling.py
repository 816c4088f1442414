"""The sampler behind every subset (max_train, max_test, the val cap, the probe batch) and the
train/val carve."""

from __future__ import annotations

import numpy as np
import pytest

from taps_cl.data.sampling import carve_validation, stratified_sample


@pytest.mark.parametrize("counts, n", [
    ([50, 50, 50, 50], 32),  # equal shares
    ([100, 100, 2], 3),  # a share below one still gets its one item
    ([5, 1, 7], 4),  # a class with one item
    ([9, 9, 9, 9, 9], 3),  # fewer items than classes: the largest shares, lowest labels first
    ([3, 3], 5),
])
def test_stratified_sample_is_seeded_proportional_and_covers_every_class(counts, n):
    labels = np.repeat(np.arange(len(counts)) * 7, counts)  # class-sorted, labels not 0..k-1
    chosen = stratified_sample(labels, n, seed=(0, 2))
    assert len(chosen) == n and np.all(np.diff(chosen) > 0)
    assert np.array_equal(chosen, stratified_sample(labels, n, seed=(0, 2)))
    got = np.array([np.sum(labels[chosen] == c) for c in np.unique(labels)])
    share = np.array(counts) * n / sum(counts)
    if n >= len(counts):
        assert got.min() >= 1 and np.all(got <= np.maximum(np.ceil(share), 1))
    else:
        assert np.all(got <= 1) and got[: n].tolist() == [1] * n
    seeds = {tuple(stratified_sample(labels, n, seed=s)) for s in range(5)}
    assert len(seeds) > 1  # the draw within each class follows the seed


def test_stratified_sample_draws_what_stored_tasks_were_measured_on():
    # A stored task's accuracy was measured on its max_test subset: re-evaluating it must draw
    # the same items, so these draws may not change.
    labels = np.repeat(np.arange(3), [6, 4, 2])
    assert stratified_sample(labels, 5, seed=(0, 2)).tolist() == [2, 5, 7, 9, 11]
    assert stratified_sample(labels, 7, seed=0).tolist() == [2, 3, 4, 5, 7, 9, 10]


def test_stratified_sample_edges():
    labels = np.array([3, 3, 1])
    assert stratified_sample(labels, 5, seed=0).tolist() == [0, 1, 2]
    assert stratified_sample(labels, 0, seed=0).tolist() == []
    assert stratified_sample(np.array([], dtype=int), 4, seed=0).tolist() == []


def test_carve_keeps_singletons_in_train_and_gives_val_one_of_each_other_class():
    labels = np.repeat([0, 1, 2], [1, 2, 40])
    train, val = carve_validation(labels, 0.1, seed=(0, 1))
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(43))
    assert np.bincount(labels[val]).tolist() == [0, 1, 4]
    assert np.bincount(labels[train]).tolist() == [1, 1, 36]
    assert carve_validation(labels, 0.0, seed=0)[1].tolist() == []
    assert np.array_equal(val, carve_validation(labels, 0.1, seed=(0, 1))[1])
