"""Baseline models registered into the idmbench registry exactly as a third-party plugin would be.

* :mod:`baselines.unet` -- ``unet``: MONAI's 3D ``DiffusionModelUNet``; ``unet-ckpt``: the same network
  with activation checkpointing around every down, middle and up block (and the output head).
* :mod:`baselines.patchddm` -- ``patchddm``: PatchDDM-3D (Bieder et al., MIDL 2023), the UNet with three
  global-coordinate input channels, trained on random half-side patches, sampled on the whole volume.

The entry points (group ``idmbench.models``) are declared in ``pyproject.toml``; each callable returns a
:class:`idmbench.registry.ModelSpec`.
"""
