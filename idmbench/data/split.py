"""The train / held-out split and the training data order: deterministic per seed, identical for every model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Split:
    """Indices into the loaded volumes.

    Attributes:
        train: volumes the models train on.
        heldout: volumes the metrics are scored on.
        heldout_is_train: True when there were fewer than two volumes, so the held-out set *is* the training
            set (scores then measure fitting, not generalisation; every output says so).
    """

    train: list[int]
    heldout: list[int]
    heldout_is_train: bool


def split_indices(n: int, seed: int = 0, heldout_fraction: float = 0.2) -> Split:
    """Split ``n`` volumes: a seeded permutation, the last ``max(1, round(fraction * n))`` held out.

    Args:
        n: number of volumes (>= 1).
        seed: the split's seed (``numpy.random.default_rng([seed, 0x5EED])``).
        heldout_fraction: in (0, 1); at least one volume is held out and at least one trains.

    With ``n == 1`` the single volume is both the training and the held-out set (``heldout_is_train``).
    """
    if int(n) < 1:
        raise ValueError(f"split_indices: need at least one volume; got {n}")
    if not 0.0 < float(heldout_fraction) < 1.0:
        raise ValueError(f"split_indices: heldout_fraction must be in (0, 1); got {heldout_fraction}")
    n = int(n)
    if n < 2:
        return Split([0], [0], True)
    perm = np.random.default_rng([int(seed), 0x5EED]).permutation(n).tolist()
    k = min(n - 1, max(1, int(round(heldout_fraction * n))))
    return Split(sorted(perm[: n - k]), sorted(perm[n - k :]), False)


def training_order(n_train: int, steps: int, batch: int, seed: int = 0) -> list[list[int]]:
    """Which training volumes (0..n_train-1) each of ``steps`` optimiser steps sees, ``batch`` per step.

    Epochs of seeded permutations, concatenated and cut into batches: every volume is seen once per epoch,
    the order is the same for every model of a run (``numpy.random.default_rng([seed, 0xDA7A])``).
    """
    if n_train < 1 or batch < 1 or steps < 0:
        raise ValueError(f"training_order: need n_train >= 1, batch >= 1, steps >= 0; got {n_train}, {batch}, {steps}")
    rng = np.random.default_rng([int(seed), 0xDA7A])
    need = steps * batch
    flat: list[int] = []
    while len(flat) < need:
        flat.extend(rng.permutation(n_train).tolist())
    return [flat[i * batch : (i + 1) * batch] for i in range(steps)]
