"""NIfTI volumes on disk (read with nibabel): a plain folder of volumes, or the BraTS layout.

Layouts, recognised in this order:

* **folder** -- ``DIR/*.nii`` and ``DIR/*.nii.gz``: each file is one volume, one channel (a 4D file gives
  its first frame).
* **brats** -- one folder per subject, ``DIR/<subject>/<subject>_<modality>.nii[.gz]`` (BraTS 2020:
  ``BraTS20_Training_001/BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii.gz``), also nested one folder
  deeper (``DIR/MICCAI_BraTS2020_TrainingData/BraTS20_Training_001/...``, as common redistributions are).
  The modality is the file name's last ``_`` or ``-`` separated part (so BraTS 2023's ``...-t1n.nii.gz``
  works too). Chosen modalities are stacked as channels; ``seg`` is a label map and never an image.

Every volume is reoriented to the closest canonical (RAS+) orientation, so array axes are (x: left ->
right, y: posterior -> anterior, z: inferior -> superior) and axial slices are ``[:, :, k]``; its voxel
spacing (mm) comes from the header. A file nibabel cannot read, or one that is not a 3D volume, is skipped
with a message (logged and returned); what remains is preprocessed by :func:`~idmbench.data.preprocess.preprocess`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import DataError
from .preprocess import preprocess

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
PATTERNS = "*.nii, *.nii.gz"
#: modality names in the order the default (first present) is picked; others follow alphabetically
MODALITY_ORDER = ("t1", "t1ce", "t2", "flair", "t1n", "t1c", "t2w", "t2f")
#: label maps: present in a subject, never an image channel
LABEL_KEYS = ("seg", "segm", "label", "mask")


class NotAVolume(ValueError):
    """A readable file that is not a 3D volume (a CIFTI matrix, a single slice)."""


@dataclass
class VolumeSource:
    """One volume to read: ``files`` maps channel name -> path (one channel for the folder layout)."""

    name: str
    files: dict[str, Path]
    labels: dict[str, Path] = field(default_factory=dict)


@dataclass
class Layout:
    """What was found under ``root``: ``kind`` ``folder`` or ``brats``, and every volume / subject."""

    root: Path
    kind: str
    sources: list[VolumeSource]

    def modalities(self) -> list[str]:
        """Image modalities of the first subject, default order first (``["image"]`` for a plain folder)."""
        if not self.sources:
            return []
        return order_modalities(self.sources[0].files)


@dataclass
class LoadedVolumes:
    """Preprocessed volumes of one folder.

    Attributes:
        volumes: (C, D, H, W) float32 tensors in [-1, 1], one per volume / subject, in name order.
        names: the volume's file stem or the subject folder's name.
        modalities: channel names (``["image"]`` for a plain folder).
        kind: ``folder`` or ``brats``.
        skipped: (file, one-line reason) of every file that could not be used.
        root: the folder.
    """

    volumes: list[torch.Tensor]
    names: list[str]
    modalities: list[str]
    kind: str
    skipped: list[tuple[str, str]]
    root: Path


def _nifti_stem(p: Path) -> str | None:
    n = p.name
    for suf in NIFTI_SUFFIXES:
        if n.lower().endswith(suf):
            return n[: -len(suf)]
    return None


def _nifti_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and _nifti_stem(p) is not None)
    except OSError:
        return []


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def modality_key(path: Path) -> str:
    """``BraTS20_Training_001_t1ce.nii.gz`` -> ``t1ce``; ``BraTS-GLI-00000-000-t2f.nii.gz`` -> ``t2f``."""
    stem = _nifti_stem(path) or path.name
    return re.split(r"[_\-]", stem)[-1].lower()


def order_modalities(names: Sequence[str]) -> list[str]:
    """Image modalities (label maps dropped) in :data:`MODALITY_ORDER`, then alphabetically."""
    img = [m for m in names if m not in LABEL_KEYS]
    known = [m for m in MODALITY_ORDER if m in img]
    return known + sorted(m for m in img if m not in MODALITY_ORDER)


def _subject(folder: Path) -> VolumeSource | None:
    files = _nifti_files(folder)
    if not files:
        return None
    chans: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for f in files:
        key = modality_key(f)
        (labels if key in LABEL_KEYS else chans).setdefault(key, f)
    return VolumeSource(folder.name, chans, labels)


def find_layout(root: str | Path) -> Layout:
    """Find the volumes under ``root`` (see the module docstring for the layouts).

    Raises:
        DataError: ``root`` is missing or not a folder, or holds no NIfTI file where the layouts look.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; give a folder of NIfTI volumes or 'synthetic'")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder; give a folder of NIfTI volumes or 'synthetic'")
    direct = _nifti_files(root)
    if direct:
        return Layout(root, "folder", [VolumeSource(_nifti_stem(f) or f.name, {"image": f}) for f in direct])
    for level in (1, 2):
        dirs = _subdirs(root) if level == 1 else [d for top in _subdirs(root) for d in _subdirs(top)]
        subjects = [s for s in (_subject(d) for d in dirs) if s is not None]
        if subjects:
            return Layout(root, "brats", subjects)
    raise DataError(
        f"no NIfTI volumes found in {root}: looked for {PATTERNS} in the folder itself, in its subfolders and "
        f"one level deeper (BraTS layout <subject>/<subject>_<modality>.nii.gz)"
    )


def read_volume(path: str | Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read one NIfTI file: (X, Y, Z) float32 array in closest-canonical (RAS+) orientation and its spacing (mm).

    A 4D (or higher) file gives its first frame.

    Raises:
        NotAVolume: not a 3D volume (e.g. a CIFTI matrix or a single slice), with its shape.
        Exception: whatever nibabel raises for an unreadable file (the caller skips it).
    """
    import nibabel as nib

    img = nib.load(str(path))
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise NotAVolume(f"a {type(img).__name__}, not a NIfTI volume")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3 or sum(s > 1 for s in shape[:3]) < 3:
        raise NotAVolume(f"not a 3D volume (shape {shape})")
    img = nib.as_closest_canonical(img)
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3:
        data = data[..., 0]
    zooms = img.header.get_zooms()[:3]
    return np.asarray(data, dtype=np.float32), tuple(float(z) for z in zooms)  # type: ignore[return-value]


def _pick_modalities(layout: Layout, modalities: Sequence[str] | None) -> list[str]:
    if layout.kind == "folder":
        if modalities:
            raise DataError(
                f"--modalities needs the BraTS layout (one folder per subject with <subject>_<modality>.nii.gz); "
                f"{layout.root} holds volume files directly"
            )
        return ["image"]
    first = layout.sources[0]
    valid = order_modalities(first.files)
    if not modalities:
        if not valid:
            raise DataError(f"subject {first.name} in {layout.root} has no image modality (only {', '.join(first.labels)})")
        return valid[:1]
    out: list[str] = []
    for m in modalities:
        m = m.lower()
        if m in LABEL_KEYS:
            raise DataError(f"--modalities: {m} is a segmentation label map, not an image; valid: {', '.join(valid)}")
        if not any(m in s.files for s in layout.sources):
            raise DataError(f"--modalities: no subject in {layout.root} has {m}; valid: {', '.join(valid)}")
        if m not in out:
            out.append(m)
    return out


def load_volumes(
    root: str | Path,
    size: Sequence[int],
    *,
    modalities: Sequence[str] | None = None,
    max_volumes: int | None = None,
    on_skip: Callable[[str, str], None] | None = None,
) -> LoadedVolumes:
    """Read and preprocess every volume under ``root`` to (C, *size) tensors in [-1, 1].

    Args:
        root: a folder of NIfTI files or in the BraTS layout.
        size: (D, H, W) voxels every volume is resampled (aspect kept) and padded to.
        modalities: BraTS layout: the channels, e.g. ``["t1", "flair"]`` (default: the first present).
        max_volumes: stop after this many usable volumes (in name order).
        on_skip: called with (file, reason) for each file skipped (without it, each is logged as a warning).

    Raises:
        DataError: missing folder, nothing found, a chosen modality missing from a subject, a volume with
            no foreground, or nothing readable at all (with the number skipped and the first reason).
    """
    layout = find_layout(root)
    mods = _pick_modalities(layout, modalities)
    vols: list[torch.Tensor] = []
    names: list[str] = []
    skipped: list[tuple[str, str]] = []

    def skip(path: Path, reason: str) -> None:
        skipped.append((str(path), reason))
        if on_skip is not None:
            on_skip(str(path), reason)
        else:
            logger.warning("skipped %s: %s", path, reason)

    for src in layout.sources:
        if max_volumes is not None and len(vols) >= max_volumes:
            break
        missing = [m for m in mods if m not in src.files]
        if missing:
            have = ", ".join(order_modalities(src.files) + sorted(src.labels)) or "nothing"
            raise DataError(f"subject {src.name} has no {', '.join(missing)} (it has {have}); choose --modalities every subject has")
        arrays, spacing, bad = [], None, False
        for m in mods:
            path = src.files[m]
            try:
                arr, sp = read_volume(path)
            except NotAVolume as exc:
                skip(path, str(exc))
                bad = True
                break
            except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a damaged file
                msg = (str(exc).strip().splitlines() or [""])[0]
                skip(path, f"nibabel cannot read it ({type(exc).__name__}{': ' + msg if msg else ''})")
                bad = True
                break
            if arrays and arr.shape != arrays[0].shape:
                skip(path, f"shape {arr.shape} differs from the subject's {mods[0]} {arrays[0].shape}")
                bad = True
                break
            arrays.append(arr)
            spacing = spacing or sp
        if bad:
            continue
        image = np.stack(arrays, axis=0)
        vols.append(preprocess(image, size, spacing or (1.0, 1.0, 1.0), name=str(src.files[mods[0]] if layout.kind == "folder" else src.name)))
        names.append(src.name)
    if not vols:
        first = f" (first: {Path(skipped[0][0]).name}: {skipped[0][1]})" if skipped else ""
        raise DataError(f"no readable NIfTI volume in {layout.root}: {len(skipped)} file(s) skipped{first}")
    return LoadedVolumes(vols, names, mods, layout.kind, skipped, layout.root)
