"""Seeded, class-stratified choices of positions: the one sampler, and the train/val carve.

`stratified_sample` picks every subset the package draws (max_train, max_test, the validation
cap and a task's probe batch). `carve_validation` splits a training pool into train and val.
Both return sorted positions into the label array they are given and depend only on the labels
and the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np

# A seed for numpy.random.SeedSequence: an int ≥ 0 or a sequence of them, e.g. (seed, 2).
Seed = Union[int, Sequence[int]]


def stratified_sample(labels: Sequence[int] | np.ndarray, n: int, seed: Seed) -> np.ndarray:
    """Sorted positions of `n` items drawn per class in proportion to the class's size.

    Every class gets at least one item when n allows (n ≥ the number of classes); otherwise the
    n items go to the classes whose proportional share is largest (lower labels first on ties).
    Each class gets its share rounded down, the classes whose shares were cut most one more, and
    its items are the first of a seeded permutation of its positions. All positions are returned
    when n ≥ len(labels); the result is the same for the same labels and seed.

    These draws are part of what a task records: its accuracy was measured on the max_test
    subset drawn here, so re-evaluating a stored task must draw the same items. scikit-learn's
    stratified split (`train_test_split(..., stratify=...)`) is therefore not used: it draws
    other items, gives a class whose share is below one nothing although n allows one, and
    refuses a class with one item.
    """
    labels = np.asarray(labels)
    total = len(labels)
    if n >= total:
        return np.arange(total)
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    take = _allocation(counts, n)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:k]
             for c, k in zip(classes, take, strict=True)]
    return np.sort(np.concatenate(picks))


def _allocation(counts: np.ndarray, n: int) -> np.ndarray:
    """Items per class: proportional shares, ≥ 1 each when n ≥ classes; n < counts.sum() in all."""
    quota = counts * n / counts.sum()
    take = np.minimum(np.floor(quota).astype(np.int64), counts)
    if n >= len(counts):
        take = np.maximum(take, 1)
    # Settle rounding: grow where the quota was cut most, shrink the largest classes.
    for c in np.argsort(-(quota - take), kind="stable"):
        if take.sum() >= n:
            break
        take[c] += int(take[c] < counts[c])
    while take.sum() > n:
        take[np.argmax(take)] -= 1
    return take


def carve_validation(labels: Sequence[int] | np.ndarray, fraction: float,
                     seed: Seed) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) positions: each class gives val round(size · fraction) of its items.

    Every class with two items or more gives val at least one and keeps at least one for train;
    a class with one item keeps it for train. These are per-class promises (a class keeps an
    item, a singleton gives none), which `stratified_sample` of a total cannot make, nor can
    scikit-learn's stratified split (it refuses a class with one item).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = [np.empty(0, dtype=np.int64)]
    for c in np.unique(labels):
        pos = rng.permutation(np.flatnonzero(labels == c))
        n = 0
        if fraction > 0 and len(pos) >= 2:
            n = min(len(pos) - 1, max(1, int(len(pos) * fraction + 0.5)))
        val.append(pos[:n])
    val_pos = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(labels)), val_pos), val_pos
