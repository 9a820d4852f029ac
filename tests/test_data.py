"""idmbench.data: NIfTI folders and the BraTS layout (nibabel), preprocessing, the synthetic default, the split."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

from idmbench.data import (  # noqa: E402
    DataError,
    find_layout,
    load_dataset,
    load_volumes,
    preprocess,
    split_indices,
    synthetic_volume,
    synthetic_volumes,
    training_order,
)

BRATS_SHAPE = (48, 40, 31)
#: the foreground box every test volume has (voxels along x, y, z) and where it starts
BOX = (40, 30, 25)
BOX_START = (4, 5, 3)
MODALITIES = ("t1", "t1ce", "t2", "flair")


def _volume(seed: int, shape=BRATS_SHAPE, box=BOX, start=BOX_START) -> np.ndarray:
    """Background 0; a box of positive, textured intensities (a skull-stripped head stand-in)."""
    rng = np.random.default_rng(seed)
    v = np.zeros(shape, dtype=np.float32)
    sl = tuple(slice(s, s + b) for s, b in zip(start, box))
    v[sl] = 100.0 + 50.0 * rng.random(box, dtype=np.float32)
    return v


def _save(arr: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0)) -> None:
    nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), str(path))


def _foreground_extent(vol: torch.Tensor) -> tuple[int, ...]:
    """Voxels per axis of the box holding every voxel above the background (-1)."""
    idx = (vol[0] > -1.0 + 1e-3).nonzero()
    return tuple(int(v) for v in (idx.max(0).values - idx.min(0).values + 1))


def write_brats(root: Path, n_subjects: int = 3, nested: bool = True) -> Path:
    """A BraTS2020-layout folder: subject folders with four modalities and a seg, .nii.gz and .nii mixed."""
    top = root / "MICCAI_BraTS2020_TrainingData" if nested else root
    for i in range(1, n_subjects + 1):
        name = f"BraTS20_Training_{i:03d}"
        d = top / name
        d.mkdir(parents=True)
        for j, m in enumerate(MODALITIES):
            ext = ".nii.gz" if (i + j) % 2 else ".nii"
            _save(_volume(10 * i + j), d / f"{name}_{m}{ext}")
        seg = (_volume(99) > 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(seg, np.eye(4)), str(d / f"{name}_seg.nii.gz"))
    return root


def test_reads_nibabels_bundled_images():
    from nibabel.testing import data_path

    skipped: list[tuple[str, str]] = []
    got = load_volumes(data_path, (16, 16, 16), on_skip=lambda f, why: skipped.append((f, why)))
    assert got.kind == "folder" and got.modalities == ["image"]
    # every NIfTI volume there (3D and 4D, NIfTI-1 and -2, .nii and .nii.gz); the CIFTI matrix is no volume
    assert {"anatomical", "example4d", "example_nifti2", "functional", "standard"} <= set(got.names)
    assert [Path(f).name for f, _ in skipped] == ["row_major.dconn.nii"] and "not a NIfTI volume" in skipped[0][1]
    assert got.skipped == skipped
    for v in got.volumes:
        assert v.shape == (1, 16, 16, 16) and v.dtype == torch.float32
        assert float(v.min()) == -1.0 and float(v.max()) <= 1.0 and float(v.max()) > 0.5


def test_brats_layout_nested_modalities_shape_range_and_aspect(tmp_path):
    root = write_brats(tmp_path)
    layout = find_layout(root)
    assert layout.kind == "brats" and [s.name for s in layout.sources] == [f"BraTS20_Training_{i:03d}" for i in (1, 2, 3)]
    assert layout.modalities() == list(MODALITIES)

    got = load_volumes(root, (32, 32, 32), modalities=["t1", "flair"])
    assert got.modalities == ["t1", "flair"] and got.skipped == []
    assert len(got.volumes) == 3
    # the 40 x 30 x 25 mm foreground fills 32 voxels along its longest axis; the others keep the ratio
    want = tuple(round(b * 32 / 40) for b in BOX)
    for v in got.volumes:
        assert v.shape == (2, 32, 32, 32)
        assert float(v.min()) >= -1.0 and float(v.max()) <= 1.0
        ext = _foreground_extent(v)
        assert all(abs(e - w) <= 1 for e, w in zip(ext, want)), (ext, want)

    # default: the first modality, one channel
    one = load_volumes(root, (16, 16, 16))
    assert one.modalities == ["t1"] and one.volumes[0].shape == (1, 16, 16, 16)
    # a non-cubic size keeps the aspect too
    rect = load_volumes(root, (16, 24, 20), max_volumes=1)
    assert len(rect.volumes) == 1 and rect.volumes[0].shape == (1, 16, 24, 20)


def test_aspect_ratio_is_physical(tmp_path):
    """Voxels of 1 x 1 x 2 mm: the z extent counts double."""
    _save(_volume(1), tmp_path / "aniso.nii.gz", spacing=(1.0, 1.0, 2.0))
    v = load_volumes(tmp_path, (32, 32, 32)).volumes[0]
    mm = (BOX[0], BOX[1], 2 * BOX[2])  # 40, 30, 50 mm
    want = tuple(round(e * 32 / max(mm)) for e in mm)
    assert all(abs(e - w) <= 1 for e, w in zip(_foreground_extent(v), want))


def test_percentile_clip_ignores_a_hot_voxel():
    x = torch.zeros(20, 20, 20)
    x[5:15, 5:15, 5:15] = torch.linspace(1.0, 2.0, 1000).reshape(10, 10, 10)
    x[10, 10, 10] = 1e6  # one outlier must not squash the rest to -1
    v = preprocess(x, (20, 20, 20))  # the 10^3 foreground box is cropped and fills the 20^3 output
    assert float(v.max()) == 1.0 and float(v.median()) > 0.0  # unclipped, the bulk would sit at -1 + 2e-6


def test_corrupt_file_is_skipped_with_a_message(tmp_path, caplog):
    _save(_volume(1), tmp_path / "a.nii.gz")
    _save(_volume(2), tmp_path / "c.nii")
    (tmp_path / "b.nii.gz").write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    msgs: list[tuple[str, str]] = []
    got = load_volumes(tmp_path, (16, 16, 16), on_skip=lambda f, why: msgs.append((f, why)))
    assert got.names == ["a", "c"] and len(got.skipped) == 1
    assert Path(msgs[0][0]).name == "b.nii.gz" and "nibabel cannot read it" in msgs[0][1]
    # without a callback the skip is logged, one line
    with caplog.at_level("WARNING", logger="idmbench.data.nifti"):
        load_volumes(tmp_path, (16, 16, 16))
    assert any("b.nii.gz" in r.getMessage() and "\n" not in r.getMessage() for r in caplog.records)


def test_corrupt_modality_skips_that_subject(tmp_path):
    root = write_brats(tmp_path, nested=False)
    bad = next((root / "BraTS20_Training_002").glob("*_flair.nii*"))
    bad.write_bytes(b"\x00" * 100)
    got = load_volumes(root, (16, 16, 16), modalities=["t1", "flair"])
    assert got.names == ["BraTS20_Training_001", "BraTS20_Training_003"]
    assert [Path(f).name for f, _ in got.skipped] == [bad.name]


@pytest.mark.parametrize(
    "setup, mods, match",
    [
        ("missing", None, "does not exist"),
        ("empty", None, r"no NIfTI volumes found in .*\*\.nii, \*\.nii\.gz"),
        ("all-corrupt", None, r"no readable NIfTI volume .*1 file\(s\) skipped"),
        ("constant", None, "no foreground"),
        ("modality-missing", ["t1", "flair"], "BraTS20_Training_002 has no flair"),
        ("seg", ["seg"], "label map, not an image"),
        ("folder-modalities", ["t1"], "needs the BraTS layout"),
    ],
)
def test_bad_data_is_one_line_error(tmp_path, setup, mods, match):
    root = tmp_path / "data"
    if setup != "missing":
        root.mkdir()
    if setup == "all-corrupt":
        (root / "x.nii").write_bytes(b"garbage")
    elif setup == "constant":
        _save(np.full((8, 8, 8), 3.0, dtype=np.float32), root / "flat.nii.gz")
    elif setup in ("modality-missing", "seg"):
        write_brats(root, nested=False)
        if setup == "modality-missing":
            next((root / "BraTS20_Training_002").glob("*_flair.nii*")).unlink()
    elif setup == "folder-modalities":
        _save(_volume(1), root / "a.nii.gz")
    with pytest.raises(DataError, match=match) as ei:
        load_volumes(root, (16, 16, 16), modalities=mods)
    assert "\n" not in str(ei.value)


def test_synthetic_is_deterministic_per_seed_and_differs_across_seeds():
    a = synthetic_volume((16, 16, 16), seed=0, index=0)
    b = synthetic_volume((16, 16, 16), seed=0, index=0)
    c = synthetic_volume((16, 16, 16), seed=1, index=0)
    d = synthetic_volume((16, 16, 16), seed=0, index=1)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05 and (a - d).abs().mean() > 0.05
    assert a.shape == (1, 16, 16, 16) and float(a.min()) == -1.0 and 0.9 < float(a.max()) <= 1.0
    # brain-like: background at -1 around a head that fills most of the box, several tissue levels inside
    inside = a[0, 4:12, 4:12, 4:12]
    assert float(a[0, 0, 0, 0]) == -1.0 and float((a > -1).float().mean()) > 0.3
    assert len(torch.unique((inside * 4).round())) >= 3
    vols = synthetic_volumes(3, (16, 24, 20), seed=5)
    assert len(vols) == 3 and all(v.shape == (1, 16, 24, 20) for v in vols)


def test_split_is_deterministic_and_falls_back_for_one_volume():
    s1, s2 = split_indices(10, seed=3), split_indices(10, seed=3)
    assert s1 == s2 and not s1.heldout_is_train
    assert len(s1.heldout) == 2 and sorted(s1.train + s1.heldout) == list(range(10))
    assert split_indices(10, seed=4).heldout != s1.heldout or split_indices(10, seed=5).heldout != s1.heldout
    two = split_indices(2, seed=0)
    assert len(two.train) == 1 and len(two.heldout) == 1 and not two.heldout_is_train
    one = split_indices(1, seed=0)
    assert one.train == [0] and one.heldout == [0] and one.heldout_is_train

    order = training_order(3, steps=7, batch=2, seed=0)
    assert order == training_order(3, steps=7, batch=2, seed=0) and len(order) == 7
    flat = [i for b in order for i in b]
    assert sorted(flat[:3]) == [0, 1, 2] and sorted(flat[3:6]) == [0, 1, 2]  # every volume once per epoch


def test_single_volume_dataset_says_heldout_is_train(tmp_path):
    _save(_volume(1), tmp_path / "only.nii.gz")
    ds = load_dataset(tmp_path, (16, 16, 16))
    assert ds.heldout_is_train and ds.train_names == ds.heldout_names == ["only"]
    assert "held-out = training set" in ds.describe()
    syn = load_dataset("synthetic", (16, 16, 16), synthetic_count=5, seed=0)
    assert syn.label == "synthetic" and len(syn.train) == 4 and len(syn.heldout) == 1 and not syn.heldout_is_train
