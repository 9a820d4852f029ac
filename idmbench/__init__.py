"""idmbench: what it costs to train and sample 3D diffusion models, with an invertible diffusion model (IDM).

Public contract::

    import idmbench
    idmbench.list_models()                      # ["idm", "patchddm", "unet", "unet-ckpt", "wdm", ...]
    model = idmbench.create_model("idm", in_channels=1, out_channels=1, preset="small", **overrides)
    eps = model(x, timesteps)                   # x: (B, C, D, H, W); timesteps: (B,) or (1,) long

The registry (:mod:`idmbench.registry`) is a leaf; importing this package imports the built-in model
modules, each of which registers itself: :mod:`idmbench.models` (``idm``) and :mod:`baselines` (``unet``,
``unet-ckpt``, ``patchddm``, ``wdm``). Third-party models come in through the entry-point group
``idmbench.models``.
"""

from .registry import ModelSpec, count_parameters, create_model, get_spec, list_models, register

from . import models  # noqa: E402,F401  (registers idm)
import baselines  # noqa: E402,F401  (registers unet, unet-ckpt, patchddm, wdm)

__all__ = ["ModelSpec", "count_parameters", "create_model", "get_spec", "list_models", "register"]
__version__ = "0.1.0"
