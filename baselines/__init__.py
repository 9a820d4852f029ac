"""Baseline models; importing this package registers each of them (each module calls ``register(SPEC)``).

* :mod:`baselines.unet` -- ``unet``: MONAI's 3D ``DiffusionModelUNet`` with SDPA attention; ``unet-ckpt``:
  the same network with activation checkpointing around every down, middle and up block (and the head).
* :mod:`baselines.gdunet` -- the guided-diffusion-style 3D UNet PatchDDM-3D and WDM-3D are built on.
* :mod:`baselines.patchddm` -- ``patchddm``: PatchDDM-3D (Bieder et al., MIDL 2023) as its public code builds
  it: additive skips, three global-coordinate input channels, trained on random half-side patches, sampled on
  the whole volume.
* :mod:`baselines.wdm` -- ``wdm``: WDM-3D (Friedrich et al., 2024): the same UNet on the 8 orthonormal Haar
  sub-bands at half resolution, x0-prediction.

``import idmbench`` imports this package: the list below is the one list of built-in baselines. Each module
also keeps a ``register()`` function returning its spec, the shape a third-party entry point has
(group ``idmbench.models``).
"""

from . import patchddm, unet, wdm  # noqa: F401  (each registers its spec on import)
