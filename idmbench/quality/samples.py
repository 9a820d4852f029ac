"""Generated samples: DDIM from pure noise with :func:`idmbench.diffusion.sample`, saved as mid-slice PNGs.

Sample ``k`` of every model starts from the same noise (a generator seeded by (seed, k)), so the models'
samples can be compared side by side. Each PNG shows the middle axial, coronal and sagittal slices of one
sample (one row per channel), grey scale over the data range [-1, 1]. Axes follow the loader's RAS+
convention for a (x, y, z) = (D, H, W) volume: axial ``[:, :, W//2]``, coronal ``[:, H//2, :]``, sagittal
``[D//2, :, :]``, each drawn with its second axis up.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import diffusion

logger = logging.getLogger(__name__)

PLANES = ("axial", "coronal", "sagittal")


def sample_seed(seed: int, k: int) -> int:
    """The torch seed of sample ``k``'s starting noise (the same for every model of a run)."""
    return int(np.random.SeedSequence([int(seed), 0x5A3B, int(k)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def generate_sample(
    model: torch.nn.Module,
    spec: Any,
    cfg: dict | None,
    shape: Sequence[int],
    *,
    k: int,
    steps: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sample ``k``: a (C, D, H, W) volume from ``steps`` DDIM steps (eta 0) of the whole volume ``shape`` = (C, D, H, W)."""
    model.eval()
    gen = torch.Generator().manual_seed(sample_seed(seed, k))
    x = diffusion.sample(
        model, (1, *[int(s) for s in shape]), num_inference_steps=int(steps), generator=gen, device=device,
        autocast_dtype=autocast_dtype, spec=spec,
    )
    return x[0].float().cpu()


def mid_slices(volume: torch.Tensor) -> dict[str, np.ndarray]:
    """(D, H, W) -> the three middle slices, each transposed so its second array axis is drawn upwards."""
    d, h, w = volume.shape
    v = volume.detach().float().cpu().numpy()
    return {"axial": v[:, :, w // 2].T, "coronal": v[:, h // 2, :].T, "sagittal": v[d // 2, :, :].T}


def save_mid_slices(
    volume: torch.Tensor,
    path: str | Path,
    *,
    title: str,
    channel_names: Sequence[str] | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """Write the middle axial, coronal and sagittal slices of ``volume`` (C, D, H, W) side by side as a PNG.

    One row per channel (labelled with ``channel_names``), grey scale over ``value_range``; ``title`` on top.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if volume.ndim != 4:
        raise ValueError(f"save_mid_slices: volume must be (C, D, H, W); got shape {tuple(volume.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    c = int(volume.shape[0])
    names = list(channel_names or [])[:c] + [f"channel {i}" for i in range(len(channel_names or []), c)]
    fig, axes = plt.subplots(c, 3, figsize=(9, 3.1 * c + 0.5), squeeze=False)
    for ci in range(c):
        sl = mid_slices(volume[ci])
        for pi, plane in enumerate(PLANES):
            ax = axes[ci][pi]
            ax.imshow(sl[plane], cmap="gray", origin="lower", vmin=value_range[0], vmax=value_range[1], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(plane if c == 1 else f"{names[ci]} - {plane}", fontsize=10)
        if c > 1:
            axes[ci][0].set_ylabel(names[ci])
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
