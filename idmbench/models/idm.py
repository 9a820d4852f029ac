"""IDM: the invertible diffusion model (lift conv -> invertible UNet core -> projection conv).

``create_model("idm", preset=..., **overrides)``; forward ``model(x, timesteps, context=None)`` with
MONAI's keyword names, so it plugs into ``monai.inferers.DiffusionInferer``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

from ..invertible.core import InvertibleUNetCore
from ..registry import ModelSpec, register

#: options IDM passes through to the core (keyword-only parameters of InvertibleUNetCore it does not set itself)
CORE_OPTIONS = tuple(
    name for name, prm in inspect.signature(InvertibleUNetCore).parameters.items()
    if prm.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("consume_input", "consume_output")
)

PRESETS: dict[str, dict[str, Any]] = {
    # tests: ~75 k parameters, every side divisible by 4
    "tiny": dict(base_channels=8, levels=2, blocks_per_level=1, attention=True, attention_min_level=1),
    # CPU default, ~1.8 M parameters
    "small": dict(base_channels=16, levels=3, blocks_per_level=2, attention=True, top_hidden_ratio=0.5),
    # GPU default: ~28 M parameters, comparable to PatchDDM-3D (~24 M at its reference settings)
    "paper": dict(base_channels=32, levels=4, blocks_per_level=2, attention=True, top_hidden_ratio=0.5),
}
# Attention on the skip paths starts at level 2 (``attention_min_level``): at levels 0-1 its recompute
# working set (q/k/v and windows of the largest skips) would set the memory peak; it stays at the
# bottleneck and on every deeper skip.


#: where each preset's settings come from (the report's model table)
IDM_SOURCES = {
    "paper": "this project's IDM at the scale of the paper's comparison: base 32, 4 levels, 2 blocks per level, "
    "attention from level 2 and at the bottleneck; ~28 M parameters, comparable to PatchDDM-3D's 24 M",
    "small": "parameter-matched (±5 %) to the other models' small preset (the CPU default)",
    "tiny": "test size",
}


class IDM(nn.Module):
    """Invertible diffusion model predicting epsilon: lift conv -> invertible UNet core -> projection conv.

    Args:
        in_channels / out_channels: image channels in and out.
        base_channels: width C of the top level of the core (divisible by 4).
        levels: 2x2x2 downsamplings in the core; every side must divide by ``2 ** levels``.
        blocks_per_level: coupling blocks per level (encoder and decoder each).
        time_embed_dim: width of the time embedding (default ``4 * base_channels``).
        core_options: passed to :class:`~idmbench.invertible.InvertibleUNetCore` as they are (its
            defaults are IDM's): ``attention``, ``attention_min_level``, ``attn_head_dim``,
            ``attn_window``, ``attn_full_max_tokens``, ``hidden_ratio``, ``top_hidden_ratio``,
            ``memory_efficient`` (False: plain autograd, the same network and parameters for the same
            seed), ``recompute_budget``, ``recompute_slabs``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 16,
        levels: int = 3,
        blocks_per_level: int = 2,
        time_embed_dim: int | None = None,
        **core_options: Any,
    ):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("base_channels", base_channels)):
            if int(v) < 1:
                raise ValueError(f"IDM {name} must be >= 1; got {v}")
        unknown = sorted(set(core_options) - set(CORE_OPTIONS))
        if unknown:
            valid = ", ".join(["base_channels", "levels", "blocks_per_level", "time_embed_dim", *CORE_OPTIONS])
            raise ValueError(f"IDM got unknown option(s) {', '.join(unknown)}; valid options: {valid}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.base_channels, self.levels = base_channels, levels
        self.time_freq_dim = base_channels
        temb_dim = time_embed_dim or 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(self.time_freq_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.lift = nn.Conv3d(in_channels, base_channels, 3, padding=1)
        # the core works in place in the lift's output and rebuilds in place in its own output: both are
        # temporaries of this forward (the output only feeds ``project``)
        self.core = InvertibleUNetCore(base_channels, levels, blocks_per_level, temb_dim,
                                       consume_input=True, consume_output=True, **core_options)
        self.project = nn.Conv3d(base_channels, out_channels, 3, padding=1)

    @property
    def divisor(self) -> int:
        return 2**self.levels

    @property
    def memory_efficient(self) -> bool:
        return self.core.memory_efficient

    @memory_efficient.setter
    def memory_efficient(self, value: bool) -> None:
        self.core.memory_efficient = bool(value)

    def check_input(self, x: torch.Tensor, timesteps: torch.Tensor | None = None) -> None:
        """Raise ValueError with what was expected if ``x`` / ``timesteps`` can't go through the model."""
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"IDM expects a 5D tensor (B, C, D, H, W); got shape {shape}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"IDM built with in_channels={self.in_channels} got {x.shape[1]} channels (shape {tuple(x.shape)})")
        d = self.divisor
        if any(s % d for s in x.shape[2:]):
            raise ValueError(f"IDM with levels={self.levels} needs every side divisible by {d}; got {tuple(x.shape[2:])}")
        if timesteps is not None:
            t = torch.as_tensor(timesteps)
            if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, x.shape[0])):
                raise ValueError(f"IDM timesteps must have shape (B,) or (1,) with B={x.shape[0]}; got {tuple(t.shape)}")

    def time_embedding(self, timesteps: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=device)
        if t.ndim == 0:
            t = t[None]
        t = t.expand(batch) if t.shape[0] == 1 else t
        emb = get_timestep_embedding(t, self.time_freq_dim)
        dtype = self.lift.weight.dtype
        return self.time_mlp(emb.to(dtype))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Predict epsilon. x: (B, C_in, D, H, W); timesteps: (B,) or (1,) long. ``context`` is ignored."""
        self.check_input(x, timesteps)
        temb = self.time_embedding(timesteps, x.shape[0], x.device)
        h = self.lift(x)
        # the core's state stays in the parameters' float type under autocast, so inversion stays exact
        h = h.to(self.lift.weight.dtype)
        h = self.core(h, temb)
        return self.project(h)

    @torch.no_grad()
    def reconstruction_error(self, x: torch.Tensor, timesteps: torch.Tensor) -> float:
        """Relative error ||core^-1(core(h)) - h|| / ||h|| of the core for this input (h = lift(x))."""
        self.check_input(x, timesteps)
        temb = self.time_embedding(timesteps, x.shape[0], x.device)
        h = self.lift(x).to(self.lift.weight.dtype)
        y = self.core.run(h, temb)
        back = self.core.inverse(y, temb)
        return float((back - h).norm() / h.norm().clamp_min(torch.finfo(h.dtype).tiny))


def build_idm(in_channels: int = 1, out_channels: int = 1, **cfg: Any) -> IDM:
    return IDM(in_channels=in_channels, out_channels=out_channels, **cfg)


SPEC = register(
    ModelSpec(
        name="idm",
        build=build_idm,
        presets=PRESETS,
        divisor=lambda cfg: 2 ** int(cfg.get("levels", 3)),
        recipe="full",
        description="Invertible diffusion model: invertible 3D UNet + invertible checkerboard attention, "
        "backward by exact inversion (no stored activations)",
        family="idm",
        attention=lambda cfg: ("invertible checkerboard attention through sdpa (full up to a token limit, windowed above)"
                               if cfg.get("attention", True) else "none"),
        sources=IDM_SOURCES,
    )
)
