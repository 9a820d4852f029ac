"""The data of a quality run: load (NIfTI folder, BraTS layout or synthetic), preprocess, split."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .nifti import load_volumes
from .split import split_indices
from .synthetic import synthetic_volumes

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"


@dataclass
class Dataset:
    """Preprocessed volumes, split.

    Attributes:
        train / heldout: (C, D, H, W) float32 tensors in [-1, 1].
        train_names / heldout_names: their names (file stem, subject folder, or ``synthetic-<i>``).
        heldout_is_train: fewer than two volumes: the held-out set is the training set.
        modalities: channel names (``["synthetic"]``, ``["image"]`` or BraTS modalities).
        label: ``"synthetic"`` or the data folder's name (the ``data`` column).
        kind: ``synthetic``, ``folder`` or ``brats``.
        skipped: (file, reason) of each unreadable file.
    """

    train: list[torch.Tensor]
    heldout: list[torch.Tensor]
    train_names: list[str]
    heldout_names: list[str]
    heldout_is_train: bool
    modalities: list[str]
    label: str
    kind: str
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def channels(self) -> int:
        return int(self.train[0].shape[0])

    def describe(self) -> str:
        """One line: what was loaded and how it was split."""
        src = f"{self.kind} data {self.label!r}" if self.kind != SYNTHETIC else "synthetic brain-like volumes"
        held = (
            "held-out = training set (fewer than two volumes: scores measure fitting, not generalisation)"
            if self.heldout_is_train
            else f"{len(self.heldout)} held out"
        )
        skip = f"; {len(self.skipped)} file(s) skipped" if self.skipped else ""
        return f"{src}: {len(self.train)} training volume(s), {held}; channels {','.join(self.modalities)}{skip}"


def load_dataset(
    data: str | Path,
    size: Sequence[int],
    *,
    modalities: Sequence[str] | None = None,
    seed: int = 0,
    heldout_fraction: float = 0.2,
    synthetic_count: int = 8,
    max_volumes: int | None = None,
    on_skip: Callable[[str, str], None] | None = None,
) -> Dataset:
    """Load ``data`` (a folder or ``"synthetic"``) at ``size`` and split it per ``seed``.

    Args:
        data: a folder of NIfTI volumes / in the BraTS layout, or ``"synthetic"``.
        size: (D, H, W) voxels.
        modalities: BraTS channels (see :func:`~idmbench.data.nifti.load_volumes`).
        seed: seeds the synthetic volumes and the split.
        heldout_fraction: share of the volumes held out (at least one).
        synthetic_count: volumes generated for ``"synthetic"``.
        max_volumes: use only the first volumes of a folder.
        on_skip: called with (file, reason) for every file skipped.

    Raises:
        DataError: see :func:`~idmbench.data.nifti.load_volumes`.
    """
    size = tuple(int(s) for s in size)
    if str(data).lower() == SYNTHETIC:
        if modalities:
            from .errors import DataError

            raise DataError("--modalities needs --data DIR in the BraTS layout; the synthetic volumes have one channel")
        vols = synthetic_volumes(synthetic_count, size, seed)
        names = [f"synthetic-{i}" for i in range(len(vols))]
        mods, label, kind, skipped = ["synthetic"], SYNTHETIC, SYNTHETIC, []
    else:
        loaded = load_volumes(data, size, modalities=modalities, max_volumes=max_volumes, on_skip=on_skip)
        vols, names, mods = loaded.volumes, loaded.names, loaded.modalities
        label, kind, skipped = Path(data).resolve().name, loaded.kind, loaded.skipped
    sp = split_indices(len(vols), seed, heldout_fraction)
    ds = Dataset(
        train=[vols[i] for i in sp.train], heldout=[vols[i] for i in sp.heldout],
        train_names=[names[i] for i in sp.train], heldout_names=[names[i] for i in sp.heldout],
        heldout_is_train=sp.heldout_is_train, modalities=list(mods), label=label, kind=kind, skipped=list(skipped),
    )
    logger.info("%s", ds.describe())
    return ds
