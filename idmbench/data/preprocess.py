"""Deterministic preprocessing of one volume to the benchmark's input: (C, D, H, W) float32 in [-1, 1].

Steps, in order (MONAI transforms where they fit; nothing random):

1. **Foreground**: voxels where any channel exceeds that channel's minimum (a skull-stripped BraTS volume:
   the brain; a volume with a constant background: everything but it). None -> :class:`DataError`.
2. **Intensity**: per channel, clip to the 0.5 / 99.5 percentiles of the whole volume and scale that range
   linearly to [-1, 1] (the percentiles by ``numpy.percentile``, the clip and scale by
   ``monai.transforms.ScaleIntensityRange``). A channel whose two percentiles coincide (foreground under
   0.5 % of the voxels) is scaled from its minimum / maximum instead.
3. **Crop** to the foreground bounding box (``generate_spatial_bounding_box`` + ``SpatialCrop``).
4. **Resample** keeping the *physical* aspect ratio (voxel spacing in mm from the NIfTI header): the box
   is scaled by one factor so that it fits the requested (D, H, W) (``Resize``: area averaging when it
   shrinks along every axis, trilinear otherwise).
5. **Pad** symmetrically to (D, H, W) with -1, the background value (``SpatialPad``).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from .errors import DataError

logger = logging.getLogger(__name__)

CLIP_PERCENTILES = (0.5, 99.5)
OUT_RANGE = (-1.0, 1.0)
BACKGROUND = OUT_RANGE[0]


def foreground_mask(image: torch.Tensor) -> torch.Tensor:
    """(C, X, Y, Z) -> (1, X, Y, Z) bool: voxels where any channel exceeds that channel's minimum."""
    mins = image.reshape(image.shape[0], -1).amin(dim=1).view(-1, 1, 1, 1)
    return (image > mins).any(dim=0, keepdim=True)


def fitted_shape(box_shape: Sequence[int], spacing: Sequence[float], size: Sequence[int]) -> tuple[int, int, int]:
    """The largest shape that fits in ``size`` with the physical aspect of ``box_shape`` x ``spacing`` (mm).

    Args:
        box_shape: voxels of the cropped box per axis.
        spacing: voxel size in mm per axis.
        size: the target (D, H, W) in voxels.
    """
    extent = [n * float(s) for n, s in zip(box_shape, spacing)]
    factor = min(t / e for t, e in zip(size, extent))
    return tuple(int(min(t, max(1, round(e * factor)))) for t, e in zip(size, extent))  # type: ignore[return-value]


def _scale_intensity(image: torch.Tensor) -> torch.Tensor:
    """Per channel: clip to the 0.5 / 99.5 percentiles and map them to [-1, 1] (MONAI ``ScaleIntensityRange``)."""
    from monai.transforms import ScaleIntensityRange

    chans = []
    for c in range(image.shape[0]):
        ch = image[c : c + 1]
        lo, hi = (float(v) for v in np.percentile(ch.numpy(), CLIP_PERCENTILES))
        if not hi > lo:  # foreground under 0.5 % of the voxels: use the full range
            lo, hi = float(ch.min()), float(ch.max())
        tr = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=OUT_RANGE[0], b_max=OUT_RANGE[1], clip=True)
        chans.append(torch.as_tensor(tr(ch), dtype=torch.float32))
    return torch.cat(chans, dim=0)


def preprocess(
    image: np.ndarray | torch.Tensor,
    size: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    name: str = "volume",
) -> torch.Tensor:
    """Clip, scale, crop, resample and pad one volume (see the module docstring).

    Args:
        image: (C, X, Y, Z) or (X, Y, Z) intensities, any real dtype; non-finite voxels become the minimum.
        size: target (D, H, W) in voxels.
        spacing: voxel size in mm along X, Y, Z (the aspect ratio is kept in physical space).
        name: what to call the volume in an error message.

    Returns:
        (C, D, H, W) float32 tensor with values in [-1, 1]; padding is -1.

    Raises:
        DataError: the volume has no foreground (every voxel of every channel has one value).
    """
    from monai.transforms import Resize, SpatialCrop, SpatialPad
    from monai.transforms.utils import generate_spatial_bounding_box

    size = tuple(int(s) for s in size)
    if len(size) != 3 or any(s <= 0 for s in size):
        raise ValueError(f"preprocess: size must be three positive sides (D, H, W); got {size}")
    x = torch.as_tensor(np.asarray(image, dtype=np.float32) if not torch.is_tensor(image) else image, dtype=torch.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"preprocess: {name} must be (C, X, Y, Z) or (X, Y, Z); got shape {tuple(x.shape)}")
    spacing = tuple(float(s) if np.isfinite(s) and s > 0 else 1.0 for s in spacing)
    if not torch.isfinite(x).all():
        finite = x[torch.isfinite(x)]
        fill = float(finite.min()) if finite.numel() else 0.0
        x = torch.nan_to_num(x, nan=fill, posinf=fill, neginf=fill)
    mask = foreground_mask(x)
    if not bool(mask.any()):
        raise DataError(f"{name}: no foreground (every voxel has the same value {float(x.flatten()[0]):g}); remove it or check the file")
    x = _scale_intensity(x)
    start, end = generate_spatial_bounding_box(mask, select_fn=lambda m: m > 0)
    x = torch.as_tensor(SpatialCrop(roi_start=start, roi_end=end)(x))
    box = tuple(int(e - s) for s, e in zip(start, end))
    shape = fitted_shape(box, spacing, size)
    if shape != box:
        if all(s <= b for s, b in zip(shape, box)):  # shrinking: box averaging (anti-aliased, fast)
            rs = Resize(spatial_size=shape, mode="area")
        else:  # growing along some axis: trilinear, smoothed first along any axis that shrinks
            rs = Resize(spatial_size=shape, mode="trilinear", align_corners=False,
                        anti_aliasing=any(s < b for s, b in zip(shape, box)))
        x = torch.as_tensor(rs(x))
    x = torch.as_tensor(SpatialPad(spatial_size=size, method="symmetric", mode="constant", value=BACKGROUND)(x))
    out = x.as_subclass(torch.Tensor).float().clamp_(*OUT_RANGE).contiguous()
    logger.debug("%s: box %s (spacing %s mm) -> %s padded to %s", name, box, spacing, shape, size)
    return out
