"""Seeded brain-like volumes, generated in memory: the default data, so every command runs with nothing downloaded.

Each volume is a skull-stripped, T1-like head phantom (intensities before scaling, in arbitrary units):

* a brain ellipsoid whose surface is deformed by a smooth random field (a different head per volume);
* nested shells from the surface in: cerebrospinal fluid (dark, 0.12), a cortex of grey matter (0.5)
  whose inner boundary folds with a finer random field (gyri), white matter (0.85);
* deep grey-matter nuclei (a mirrored pair of ellipsoids) and two lateral ventricles (CSF) near the centre;
* one to three lesions: bright spheres with a darker core in some;
* smooth multiplicative texture (a bias-field-like low-frequency field, +-8 %) and Gaussian noise (sigma
  0.02) inside the brain; background exactly 0.

Tissue boundaries are soft (a logistic ramp about one voxel wide), so there are partial-volume effects at
every size. Every random choice is drawn from ``numpy.random.default_rng([seed, index])``: the same
(seed, index, size) always gives the same volume, on any machine; different seeds give different heads.
The volume then goes through the same :func:`~idmbench.data.preprocess.preprocess` as real data.
Array axes follow the NIfTI convention used by the loader: (x, y, z) with axial slices ``[:, :, k]``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .preprocess import preprocess

CSF, GREY, WHITE, LESION, NECROSIS = 0.12, 0.5, 0.85, 1.0, 0.3


def _smooth_field(rng: np.random.Generator, size: Sequence[int], grid: int) -> torch.Tensor:
    """A smooth random field of ``size`` with unit-ish amplitude: a ``grid``^3 Gaussian lattice, trilinear up."""
    coarse = torch.from_numpy(rng.standard_normal((1, 1, grid, grid, grid)).astype(np.float32))
    return F.interpolate(coarse, size=tuple(size), mode="trilinear", align_corners=True)[0, 0]


def _soft_inside(d: torch.Tensor, width: float) -> torch.Tensor:
    """1 inside (d < 0), 0 outside (d > 0), a logistic ramp of ``width`` in between."""
    return torch.sigmoid(-d / max(width, 1e-6))


def _rotation(rng: np.random.Generator, max_deg: float) -> torch.Tensor:
    a, b, c = (math.radians(v) for v in rng.uniform(-max_deg, max_deg, 3))
    rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return (rz @ ry @ rx).float()


def brain_phantom(size: Sequence[int], seed: int = 0, index: int = 0) -> torch.Tensor:
    """Raw phantom intensities (background 0, white matter ~0.85) of shape ``size`` = (X, Y, Z).

    Args:
        size: voxels per axis; any positive sides (the head keeps a fixed physical aspect and fills ~90 % of
            the shortest side).
        seed: the data seed.
        index: which volume of the seed's series.
    """
    size = tuple(int(s) for s in size)
    if len(size) != 3 or any(s <= 0 for s in size):
        raise ValueError(f"brain_phantom: size must be three positive sides (X, Y, Z); got {size}")
    rng = np.random.default_rng([int(seed), int(index)])
    smin = min(size)
    voxel = 2.0 / smin  # isotropic voxels: the shortest side spans [-1, 1]
    axes = [(torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * voxel for n in size]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (X, Y, Z, 3)
    rot = _rotation(rng, 8.0)
    shift = torch.from_numpy(rng.uniform(-0.03, 0.03, 3).astype(np.float32))
    p = (grid - shift) @ rot.T
    # left-right (x) narrower than front-back (y); superior-inferior (z) in between
    semi = torch.tensor([0.74, 0.90, 0.80]) * torch.from_numpy(rng.uniform(0.93, 1.03, 3).astype(np.float32))
    semi = semi * 0.95 / semi.max()
    r = (p / semi).norm(dim=-1)
    surface = 1.0 + 0.05 * _smooth_field(rng, size, 5)
    folds = 0.07 * _smooth_field(rng, size, 13)
    w = 0.35 * voxel  # boundary ramp about one voxel wide (10-90 %)
    brain = _soft_inside(r - surface, w)
    cortex_in = _soft_inside(r - (surface - 0.06), w)  # inside the CSF rim
    wm = _soft_inside(r - (surface - 0.26 + folds), w)  # inside the cortex (folded boundary)
    img = brain * CSF + cortex_in * (GREY - CSF) + wm * (WHITE - GREY)

    def ellipsoid(centre: Sequence[float], radii: Sequence[float]) -> torch.Tensor:
        d = ((p - torch.tensor(centre, dtype=torch.float32)) / torch.tensor(radii, dtype=torch.float32)).norm(dim=-1)
        return _soft_inside(d - 1.0, w / min(radii))

    jit = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    for side in (-1.0, 1.0):  # deep grey nuclei and lateral ventricles, mirrored left/right
        nuc = ellipsoid((side * jit(0.17, 0.22), jit(-0.02, 0.06), jit(-0.10, -0.02)), (0.09, 0.14, 0.10))
        img = img + nuc * (GREY - img)
        ven = ellipsoid((side * jit(0.06, 0.10), jit(0.02, 0.10), jit(0.05, 0.12)), (jit(0.04, 0.06), jit(0.20, 0.28), jit(0.06, 0.09)))
        img = img + ven * (CSF - img)
    for _ in range(int(rng.integers(1, 4))):  # lesions inside the white matter
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        centre = (direction * rng.uniform(0.15, 0.5) * semi.numpy()).tolist()
        rad = float(rng.uniform(0.05, 0.13))
        les = ellipsoid(centre, (rad, rad * jit(0.8, 1.2), rad * jit(0.8, 1.2)))
        img = img + les * (LESION - img)
        if rng.uniform() < 0.5:
            core = ellipsoid(centre, (rad * 0.45,) * 3)
            img = img + core * (NECROSIS - img)
    bias = 1.0 + 0.08 * _smooth_field(rng, size, 3).clamp(-1.5, 1.5) / 1.5
    texture = 1.0 + 0.03 * _smooth_field(rng, size, 17)
    noise = torch.from_numpy(rng.standard_normal(size).astype(np.float32)) * 0.02
    img = (img * bias * texture + noise) * (brain > 0.5)
    return img.clamp_(min=0.0)


def synthetic_volume(size: Sequence[int], seed: int = 0, index: int = 0) -> torch.Tensor:
    """One preprocessed synthetic volume: (1, D, H, W) float32 in [-1, 1] (see the module docstring)."""
    size = tuple(int(s) for s in size)
    return preprocess(brain_phantom(size, seed, index)[None], size, name=f"synthetic volume {index} (seed {seed})")


def synthetic_volumes(n: int, size: Sequence[int], seed: int = 0) -> list[torch.Tensor]:
    """``n`` preprocessed synthetic volumes (indices 0..n-1 of ``seed``'s series), each (1, D, H, W) in [-1, 1]."""
    if int(n) < 1:
        raise ValueError(f"synthetic_volumes: n must be >= 1; got {n}")
    return [synthetic_volume(size, seed, i) for i in range(int(n))]
