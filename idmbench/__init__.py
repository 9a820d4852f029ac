"""idmbench: what it costs to train and sample 3D diffusion models, with an invertible diffusion model (IDM).

Public contract::

    import idmbench
    idmbench.list_models()                      # ["idm", "patchddm", "unet", "unet-ckpt", ...]
    model = idmbench.create_model("idm", in_channels=1, out_channels=1, preset="small", **overrides)
    eps = model(x, timesteps)                   # x: (B, C, D, H, W); timesteps: (B,) or (1,) long
"""

from .registry import ModelSpec, count_parameters, create_model, get_spec, list_models, register

__all__ = ["ModelSpec", "count_parameters", "create_model", "get_spec", "list_models", "register"]
__version__ = "0.1.0"
