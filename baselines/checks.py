"""Input checks shared by every baseline's ``forward``: one-line ``ValueError`` instead of a shape error deep inside.

Each baseline calls :func:`check_model_input` before running its network, so a bad volume fails with a
message naming the model, the shape it got and the valid choices.
"""

from __future__ import annotations

import torch


def check_model_input(
    name: str,
    x: torch.Tensor,
    timesteps: torch.Tensor | int,
    *,
    channels: int,
    divisor: int,
    divisor_reason: str = "",
) -> torch.Tensor:
    """Check ``x`` and ``timesteps``; return the timesteps as a (B,) tensor (a (1,)/0-d one broadcast).

    Args:
        name: the registry name, used in the messages.
        x: the input, (B, ``channels``, D, H, W).
        timesteps: (B,), (1,) or 0-d integer timesteps (a Python int is accepted too).
        channels: the number of channels ``x`` must have.
        divisor: every spatial side of ``x`` must be a multiple of this.
        divisor_reason: appended to the side error (e.g. ``" (the Haar transform halves each side)"``).

    Raises:
        ValueError: one line naming the model, what it got and the valid choices.
    """
    if not torch.is_tensor(x) or x.ndim != 5:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name}: x must be a 5-D tensor (B, C, D, H, W); got shape {shape}")
    if x.shape[1] != channels:
        raise ValueError(f"{name}: x must have {channels} channel(s) (B, {channels}, D, H, W); got shape {tuple(x.shape)}")
    size = tuple(int(s) for s in x.shape[2:])
    d = int(divisor)
    if any(s % d for s in size):
        raise ValueError(
            f"{name} needs every side divisible by {d}{divisor_reason}; got {size}; valid sides: {d}, {2 * d}, {4 * d}, ..."
        )
    b = x.shape[0]
    t = timesteps if torch.is_tensor(timesteps) else torch.as_tensor(timesteps, device=x.device)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1 or t.shape[0] not in (1, b):
        raise ValueError(f"{name}: timesteps must have shape ({b},) or (1,); got {tuple(t.shape)}")
    return t.expand(b) if t.shape[0] != b else t
