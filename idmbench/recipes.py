"""Training recipes as objects: everything about a model that depends on *how* it is trained and sampled.

A recipe says, for a model spec and a volume of side(s) S:

* which sides are valid (:meth:`Recipe.valid_sides`, :meth:`Recipe.check_size` with a one-line error naming
  the valid multiples);
* the spatial shape and the channel count the *network* sees in each phase (:meth:`Recipe.network_shape`,
  :meth:`Recipe.network_channels`) -- what results record as ``net_shape``;
* the number of image voxels one step processes per volume (:meth:`Recipe.network_voxels`): the
  throughput basis of ``voxels_per_s``;
* how a training example is drawn from a clean batch (:meth:`Recipe.example`) and a fixed one for
  memory probes (:meth:`Recipe.probe_example`);
* the map from image data to the diffusion state and back (:meth:`Recipe.encode` / :meth:`Recipe.decode`;
  the identity except for the wavelet recipe) and the default prediction target (``"epsilon"``: the
  network predicts the noise; ``"sample"``: it predicts x0).

The built-in recipes:

* ``full`` (:class:`FullVolume`) -- the network sees the whole volume in training and sampling;
* ``patch`` (:class:`PatchRecipe`) -- PatchDDM-3D: training on a random patch of ``patch_fraction`` of
  each side, the network also receiving the patch's global voxel coordinates (keyword ``coords``,
  (B, 3, d, h, w)); sampling on the whole volume (the model builds the global grid itself);
* ``wavelet`` (:class:`WaveletRecipe`) -- WDM-3D: the model's forward is ``IDWT(UNet(DWT(x)))`` on image
  tensors; the UNet sees the 8 orthonormal Haar sub-bands per image channel at half resolution,
  (8 C, S/2, S/2, S/2), and predicts x0. Because the Haar DWT is orthonormal, the DWT of i.i.d. N(0, 1)
  noise is i.i.d. N(0, 1) and squared errors are preserved, so the shared image-space step *is* WDM's
  wavelet-space diffusion; the data map scales the low-pass (LLL) band by 1/3 as WDM-3D does (its
  ``x_start_dwt = cat(LLL / 3, ...)``).

A plugin brings its own with :func:`register_recipe` (a :class:`Recipe` subclass instance), and its
spec names it (``ModelSpec(recipe="mine")``); nothing outside the plugin's file changes.

This module is a leaf: it imports torch only, and takes the model spec as an argument (anything with
``name``, ``divisor(cfg)`` and ``patch_fraction``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

PHASES = ("train", "sample")
PREDICTION_TYPES = ("epsilon", "sample")
#: extra input channels the patch recipe passes to the model (global voxel coordinates)
COORD_CHANNELS = 3


@dataclass
class Patch:
    """A training example cut from a volume.

    Attributes:
        x0: the clean example, (B, C, d, h, w) (the whole volume for the ``full`` and ``wavelet`` recipes).
        origin: voxel index of the example's first voxel in the volume, per spatial axis.
        model_kwargs: extra keyword arguments for the model's forward (``coords`` for ``patch``).
    """

    x0: torch.Tensor
    origin: tuple[int, int, int]
    model_kwargs: dict[str, Any]


# ------------------------------------------------------------------------------------------ coordinates


def patch_coordinates(
    volume: Sequence[int],
    origin: Sequence[int],
    patch: Sequence[int],
    batch: int = 1,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Global voxel-centre coordinates in [-1, 1] of a patch: a (batch, 3, *patch) tensor.

    Channel ``a`` holds the coordinate along spatial axis ``a`` of the *volume*: ``-1 + 2 * i / (n - 1)``
    for voxel index ``i`` of ``n`` (0 for an axis of length 1), for ``i`` in ``origin[a] .. origin[a] +
    patch[a] - 1``. Only the patch is allocated (not the whole volume's grid); the values equal the
    corresponding slice of :func:`global_coordinates` exactly. The batch dimension is an ``expand``-ed view.
    """
    volume, origin, patch = (tuple(int(v) for v in s) for s in (volume, origin, patch))
    if not (len(volume) == len(origin) == len(patch) == 3) or any(n <= 0 for n in volume + patch):
        raise ValueError(f"patch_coordinates: volume and patch are three positive sides (D, H, W); got {volume}, {patch}")
    if any(o < 0 or o + p > n for o, p, n in zip(origin, patch, volume)):
        raise ValueError(f"patch_coordinates: a patch {patch} at {origin} does not fit in the volume {volume}")
    axes = [
        (torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) if n > 1 else torch.zeros(1, device=device, dtype=dtype))[o : o + p]
        for n, o, p in zip(volume, origin, patch)
    ]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
    return grid.unsqueeze(0).expand(int(batch), -1, -1, -1, -1)


def global_coordinates(shape: Sequence[int], batch: int = 1, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel-centre coordinates in [-1, 1] over a volume of ``shape`` (D, H, W): a (batch, 3, D, H, W) tensor.

    Channel ``a`` holds the coordinate along spatial axis ``a``: ``-1 + 2 * i / (n - 1)`` for voxel index ``i``
    of ``n`` (first voxel at -1, last at +1; 0 for an axis of length 1). The batch dimension is an
    ``expand``-ed view: no memory per batch element.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or any(n <= 0 for n in shape):
        raise ValueError(f"global_coordinates: shape must be three positive sides (D, H, W); got {shape}")
    return patch_coordinates(shape, (0, 0, 0), shape, batch, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- recipes


def _check_phase(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; valid phases: {', '.join(PHASES)}")
    return phase


def _gen_device(generator: torch.Generator | None) -> torch.device | None:
    return generator.device if generator is not None else None


class Recipe:
    """The full-volume recipe, and the base class of every other one.

    Subclasses override what differs; every method takes the model ``spec`` (for its name, divisor and
    defaults) and the merged model ``cfg``.

    Attributes:
        name: the name specs use (``ModelSpec(recipe=name)``).
        prediction_type: the default prediction target, ``"epsilon"`` or ``"sample"`` (x0).
    """

    name = "full"
    prediction_type = "epsilon"

    # ------------------------------------------------------------------ sizes
    def divisor(self, spec: Any, cfg: dict[str, Any]) -> int:
        """Every side the *network* sees must divide by this (the spec's ``divisor(cfg)``)."""
        return int(spec.divisor(cfg))

    def valid_sides(self, spec: Any, cfg: dict[str, Any]) -> int:
        """The multiple every volume side must be (training and sampling)."""
        return self.divisor(spec, cfg)

    def check_size(self, spec: Any, size: tuple[int, int, int], cfg: dict[str, Any]) -> None:
        """Raise a one-line ``ValueError`` naming the model, the size and the valid multiples."""
        d = self.divisor(spec, cfg)
        if any(s % d for s in size):
            raise ValueError(f"{spec.name} needs every side divisible by {d}; got {size}; valid sides: {d}, {2 * d}, {4 * d}, ...")

    # ------------------------------------------------------- what the network sees
    def network_shape(self, spec: Any, size: tuple[int, int, int], cfg: dict[str, Any], phase: str) -> tuple[int, ...]:
        """Spatial shape (no channels) the network runs at in one step of ``phase`` for a volume of ``size``."""
        _check_phase(phase)
        return tuple(int(s) for s in size)

    def network_channels(self, spec: Any, cfg: dict[str, Any], in_channels: int = 1) -> int:
        """Channels the network's first layer takes for ``in_channels`` image channels."""
        return int(in_channels)

    def network_voxels(self, spec: Any, size: tuple[int, int, int], cfg: dict[str, Any], phase: str) -> int:
        """Image voxels one step of ``phase`` processes per volume (the throughput basis)."""
        _check_phase(phase)
        return int(math.prod(int(s) for s in size))

    def describe_input(self, spec: Any, cfg: dict[str, Any], in_channels: int = 1) -> str:
        """One line for the report: what the network sees in training and in sampling."""
        return f"the whole volume, {in_channels} channel(s), (C, S, S, S), in training and sampling"

    # ------------------------------------------------------------- examples
    def example(self, x0: torch.Tensor, spec: Any, cfg: dict[str, Any], generator: torch.Generator | None = None) -> Patch:
        """The training example cut from the clean batch ``x0`` (B, C, D, H, W): here the whole volume."""
        return Patch(x0, (0, 0, 0), {})

    def probe_example(
        self,
        spec: Any,
        size: tuple[int, int, int],
        cfg: dict[str, Any],
        batch: int = 1,
        channels: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Patch:
        """A training example at a fixed position (origin 0), built directly at its own size with random
        values: what memory probes feed the model (no whole volume allocated, no random draw to read back,
        so it also works on fake tensors)."""
        return Patch(torch.randn((int(batch), int(channels)) + tuple(size), device=device, dtype=dtype), (0, 0, 0), {})

    # -------------------------------------------------------------- data map
    def encode(self, x0: torch.Tensor, cfg: dict[str, Any] | None = None) -> torch.Tensor:
        """Image data -> diffusion state (same shape). The identity here."""
        return x0

    def decode(self, x: torch.Tensor, cfg: dict[str, Any] | None = None) -> torch.Tensor:
        """Diffusion state -> image data; the exact inverse of :meth:`encode`. The identity here."""
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, prediction_type={self.prediction_type!r})"


class FullVolume(Recipe):
    """``full``: the network sees the whole volume in training and sampling (epsilon-prediction)."""


def patch_fraction(spec: Any, cfg: dict[str, Any]) -> float:
    """The side fraction of the training patch: ``cfg["patch_fraction"]`` or the spec's default, in (0, 1]."""
    raw = cfg.get("patch_fraction", getattr(spec, "patch_fraction", 0.5))
    try:
        frac = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{spec.name}: patch_fraction must be a number in (0, 1]; got {raw!r}") from None
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"{spec.name}: patch_fraction must be in (0, 1]; got {frac}")
    return frac


def _patch_ok(side: int, frac: float, d: int) -> bool:
    p = int(round(side * frac))
    return side % d == 0 and p > 0 and p % d == 0


class PatchRecipe(Recipe):
    """``patch``: PatchDDM-3D -- training on random patches with their global coordinates, sampling whole.

    The patch side is ``round(S * patch_fraction)``; both it (training) and S (sampling) must divide by the
    network's divisor. The network's first layer takes the image channels + 3 coordinate channels.
    """

    name = "patch"

    def patch_shape(self, spec: Any, size: Sequence[int], cfg: dict[str, Any]) -> tuple[int, ...]:
        frac = patch_fraction(spec, cfg)
        return tuple(max(1, int(round(int(s) * frac))) for s in size)

    def valid_sides(self, spec: Any, cfg: dict[str, Any]) -> int:
        d, frac = self.divisor(spec, cfg), patch_fraction(spec, cfg)
        m = d
        while not _patch_ok(m, frac, d):
            m += d
        return m

    def check_size(self, spec: Any, size: tuple[int, int, int], cfg: dict[str, Any]) -> None:
        d, frac = self.divisor(spec, cfg), patch_fraction(spec, cfg)
        if any(not _patch_ok(s, frac, d) for s in size):
            m = self.valid_sides(spec, cfg)
            raise ValueError(
                f"{spec.name} needs every side divisible by {d} for sampling and its training patch "
                f"(fraction {frac:g} of the side) divisible by {d} too; got {size}; "
                f"valid sides are multiples of {m} (e.g. {m}, {2 * m}, {4 * m})"
            )

    def network_shape(self, spec: Any, size: tuple[int, int, int], cfg: dict[str, Any], phase: str) -> tuple[int, ...]:
        _check_phase(phase)
        return self.patch_shape(spec, size, cfg) if phase == "train" else tuple(int(s) for s in size)

    def network_channels(self, spec: Any, cfg: dict[str, Any], in_channels: int = 1) -> int:
        return int(in_channels) + COORD_CHANNELS

    def network_voxels(self, spec: Any, size: tuple[int, int, int], cfg: dict[str, Any], phase: str) -> int:
        return int(math.prod(self.network_shape(spec, size, cfg, phase)))

    def describe_input(self, spec: Any, cfg: dict[str, Any], in_channels: int = 1) -> str:
        frac = patch_fraction(spec, cfg)
        return (
            f"training: a random patch of {frac:g} of each side with its 3 global-coordinate channels "
            f"({in_channels} + 3 channels); sampling: the whole volume with its coordinate grid"
        )

    def example(self, x0: torch.Tensor, spec: Any, cfg: dict[str, Any], generator: torch.Generator | None = None) -> Patch:
        """Crop a random patch of ``patch_fraction`` of each side, with its global coordinates.

        One origin per batch, uniform over the positions where the patch fits; ``coords`` is the patch's
        slice of the global coordinate grid of the *whole* volume, (B, 3, d, h, w).
        """
        size = tuple(x0.shape[2:])
        pshape = self.patch_shape(spec, size, cfg)
        origin = tuple(
            int(torch.randint(0, s - p + 1, (1,), generator=generator, device=_gen_device(generator)).item()) if s > p else 0
            for s, p in zip(size, pshape)
        )
        sl = (slice(None), slice(None)) + tuple(slice(o, o + p) for o, p in zip(origin, pshape))
        coords = patch_coordinates(size, origin, pshape, x0.shape[0], device=x0.device, dtype=x0.dtype)
        return Patch(x0[sl], origin, {"coords": coords})  # type: ignore[arg-type]

    def probe_example(self, spec, size, cfg, batch=1, channels=1, *, device=None, dtype=torch.float32) -> Patch:
        pshape = self.patch_shape(spec, size, cfg)
        x = torch.randn((int(batch), int(channels)) + pshape, device=device, dtype=dtype)
        coords = patch_coordinates(size, (0, 0, 0), pshape, int(batch), device=device, dtype=dtype)
        return Patch(x, (0, 0, 0), {"coords": coords})


def lowpass_mean(x: torch.Tensor) -> torch.Tensor:
    """Each 2x2x2 block's mean broadcast back over the block, (B, C, D, H, W): the image-space part of
    ``x`` carried by the orthonormal Haar low-pass (LLL) band (whose coefficient is ``sqrt(8)`` x the mean)."""
    return F.interpolate(F.avg_pool3d(x, 2), scale_factor=2, mode="nearest")


class WaveletRecipe(Recipe):
    """``wavelet``: WDM-3D -- diffusion of the orthonormal 3D Haar sub-bands, x0-prediction.

    The model's forward is ``IDWT(UNet(DWT(x_t)))`` on image tensors, so the training example is the whole
    volume; the UNet sees ``(8 C, S/2, S/2, S/2)``. The diffusion state is the image whose LLL band is
    scaled by ``lowpass_scale`` (WDM-3D: 1/3), i.e. ``encode(x) = x + (s - 1) * blockmean(x)``: in wavelet
    space exactly WDM's ``cat(LLL / 3, LLH, ..., HHH)``. One step processes the S^3 image voxels.

    Args:
        name: the recipe name.
        lowpass_scale: factor on the Haar low-pass band of the data (WDM-3D: 1/3).
    """

    name = "wavelet"
    prediction_type = "sample"

    def __init__(self, name: str = "wavelet", lowpass_scale: float = 1.0 / 3.0):
        if not lowpass_scale > 0:
            raise ValueError(f"wavelet recipe: lowpass_scale must be > 0; got {lowpass_scale}")
        self.name = name
        self.lowpass_scale = float(lowpass_scale)

    def valid_sides(self, spec: Any, cfg: dict[str, Any]) -> int:
        return 2 * self.divisor(spec, cfg)

    def check_size(self, spec: Any, size: tuple[int, int, int], cfg: dict[str, Any]) -> None:
        d = self.divisor(spec, cfg)
        m = 2 * d
        if any(s % m for s in size):
            raise ValueError(
                f"{spec.name} needs every side divisible by {m} (the Haar transform halves each side and its UNet "
                f"divides the half by {d}); got {size}; valid sides: {m}, {2 * m}, {4 * m}, ..."
            )

    def network_shape(self, spec: Any, size: tuple[int, int, int], cfg: dict[str, Any], phase: str) -> tuple[int, ...]:
        _check_phase(phase)
        return tuple(int(s) // 2 for s in size)

    def network_channels(self, spec: Any, cfg: dict[str, Any], in_channels: int = 1) -> int:
        return 8 * int(in_channels)

    def describe_input(self, spec: Any, cfg: dict[str, Any], in_channels: int = 1) -> str:
        return (
            f"the 8 orthonormal Haar sub-bands of the whole volume at half resolution, "
            f"(8 x {in_channels} = {8 * in_channels}, S/2, S/2, S/2), in training and sampling; "
            f"low-pass band scaled by {self.lowpass_scale:.4g}; predicts x0"
        )

    def encode(self, x0: torch.Tensor, cfg: dict[str, Any] | None = None) -> torch.Tensor:
        return x0 + (self.lowpass_scale - 1.0) * lowpass_mean(x0)

    def decode(self, x: torch.Tensor, cfg: dict[str, Any] | None = None) -> torch.Tensor:
        return x + (1.0 / self.lowpass_scale - 1.0) * lowpass_mean(x)


class FunctionRecipe(FullVolume):
    """A full-volume recipe whose training example is drawn by ``fn(x0, spec, cfg, generator) -> Patch``
    (what :func:`idmbench.diffusion.register_recipe` builds from a plain function)."""

    def __init__(self, name: str, fn: Callable[..., Patch], prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"recipe {name!r}: prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {prediction_type!r}")
        self.name, self.fn, self.prediction_type = name, fn, prediction_type

    def example(self, x0, spec, cfg, generator=None) -> Patch:
        return self.fn(x0, spec, cfg, generator)


#: recipe name -> :class:`Recipe`; a plugin adds its own with :func:`register_recipe`
RECIPES: dict[str, Recipe] = {"full": FullVolume(), "patch": PatchRecipe(), "wavelet": WaveletRecipe()}


def register_recipe(recipe: Recipe, *, overwrite: bool = False) -> Recipe:
    """Make ``recipe`` available to specs as ``ModelSpec(recipe=recipe.name)``.

    Raises:
        ValueError: a different recipe already has that name (pass ``overwrite=True`` to replace it).
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"register_recipe() takes a Recipe; got {type(recipe).__name__}")
    if recipe.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"recipe {recipe.name!r}: prediction_type must be one of {', '.join(PREDICTION_TYPES)}")
    old = RECIPES.get(recipe.name)
    if old is not None and old is not recipe and not overwrite:
        raise ValueError(f"a recipe named {recipe.name!r} is already registered; valid recipes: {', '.join(RECIPES)}")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str, model: str = "") -> Recipe:
    """The recipe called ``name``; an unknown name raises ``ValueError`` listing the valid ones."""
    r = RECIPES.get(name)
    if r is None:
        who = f"{model}: " if model else ""
        raise ValueError(f"{who}unknown recipe {name!r}; valid: {', '.join(k for k, v in RECIPES.items() if v is not None)}")
    return r
