"""The model registry: one obvious entry point, names that users type, specs that carry their defaults.

Built-in models (``idm``) register on import; the baselines and any third-party model come in through
the entry-point group ``idmbench.models``: each entry point names a callable that either registers a
:class:`ModelSpec` itself (via :func:`register`) or returns one (or a list of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Sequence

import torch.nn as nn

ENTRY_POINT_GROUP = "idmbench.models"

_REGISTRY: dict[str, "ModelSpec"] = {}
_PLUGINS_LOADED = False
_PLUGIN_ERRORS: dict[str, str] = {}


@dataclass
class ModelSpec:
    """Everything the suite needs to know about one model.

    Attributes:
        name: the string users type (``--models idm``).
        build: ``build(in_channels, out_channels, **config) -> nn.Module``; the module's forward is
            MONAI's ``forward(x, timesteps, context=None)``.
        presets: preset name -> config dict. ``tiny`` (tests), ``small`` (CPU) and ``paper`` (GPU) are
            expected; a plugin may bring others.
        divisor: ``divisor(config) -> int``: every spatial side the *network* sees must divide by it.
        recipe: how a training step feeds the network: ``"full"`` (the whole volume) or ``"patch"``
            (random patches of ``patch_fraction`` of each side, PatchDDM-style, plus coordinates).
        patch_fraction: side fraction of the training patch for the ``patch`` recipe.
        description: one line for the report.
        family: groups models that are the same network (``unet`` and ``unet-ckpt``).
    """

    name: str
    build: Callable[..., nn.Module]
    presets: dict[str, dict[str, Any]]
    divisor: Callable[[dict[str, Any]], int]
    recipe: str = "full"
    patch_fraction: float = 0.5
    description: str = ""
    family: str = ""
    source: str = "builtin"
    extra: dict[str, Any] = field(default_factory=dict)

    def config(self, preset: str = "small", **overrides: Any) -> dict[str, Any]:
        """The merged config for ``preset`` with ``overrides`` applied."""
        if preset not in self.presets:
            raise ValueError(
                f"model {self.name!r} has no preset {preset!r}; valid presets: {', '.join(sorted(self.presets))}"
            )
        cfg = dict(self.presets[preset])
        cfg.update(overrides)
        return cfg

    def patch_fraction_for(self, cfg: dict[str, Any]) -> float:
        frac = float(cfg.get("patch_fraction", self.patch_fraction))
        if not 0.0 < frac <= 1.0:
            raise ValueError(f"{self.name}: patch_fraction must be in (0, 1]; got {frac}")
        return frac

    def train_shape(self, size: Sequence[int], cfg: dict[str, Any]) -> tuple[int, ...]:
        """Spatial shape the network runs at in a training step for a volume of ``size``."""
        if self.recipe == "patch":
            frac = self.patch_fraction_for(cfg)
            return tuple(max(1, int(round(s * frac))) for s in size)
        return tuple(size)

    def valid_sides(self, cfg: dict[str, Any]) -> int:
        """The multiple every volume side must be for this model (training and sampling)."""
        d = int(self.divisor(cfg))
        if self.recipe == "patch":
            frac = self.patch_fraction_for(cfg)
            # the patch side round(S * frac) must divide by d, and the full volume (sampling) too
            m = d
            while not _patch_ok(m, frac, d):
                m += d
            return m
        return d

    def check_size(self, size: Sequence[int], cfg: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the model, the size and the valid multiples if ``size`` is unusable."""
        size = tuple(int(s) for s in size)
        if len(size) != 3 or any(s <= 0 for s in size):
            raise ValueError(f"{self.name}: a volume size is three positive sides (D, H, W); got {size}")
        d = int(self.divisor(cfg))
        if self.recipe == "patch":
            frac = self.patch_fraction_for(cfg)
            bad = [s for s in size if s % d or not _patch_ok(s, frac, d)]
            if bad:
                m = self.valid_sides(cfg)
                raise ValueError(
                    f"{self.name} needs every side divisible by {d} for sampling and its training patch "
                    f"(fraction {frac:g} of the side) divisible by {d} too; got {size}; "
                    f"valid sides are multiples of {m} (e.g. {m}, {2 * m}, {4 * m})"
                )
        elif any(s % d for s in size):
            raise ValueError(
                f"{self.name} needs every side divisible by {d}; got {size}; valid sides: {d}, {2 * d}, {4 * d}, ..."
            )


def _patch_ok(side: int, frac: float, d: int) -> bool:
    p = int(round(side * frac))
    return side % d == 0 and p > 0 and p % d == 0


def register(spec: ModelSpec, *, overwrite: bool = False) -> ModelSpec:
    """Add ``spec`` to the registry. Re-registering the same name needs ``overwrite=True``."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register() takes a ModelSpec; got {type(spec).__name__}")
    if spec.name in _REGISTRY and not overwrite and _REGISTRY[spec.name] is not spec:
        existing = _REGISTRY[spec.name]
        if existing.build is spec.build:
            return existing
        raise ValueError(f"a model named {spec.name!r} is already registered (from {existing.source})")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from . import models  # noqa: F401  (registers the built-in IDM)

    eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    names = {ep.name for ep in eps}
    for ep in eps:
        _load_entry_point(ep.name, ep.load)
    # Running from a source checkout without `pip install`: the baselines' entry points are absent,
    # so register them the same way by hand.
    for name, target in (
        ("unet", "baselines.unet:register"),
        ("unet-ckpt", "baselines.unet:register_ckpt"),
        ("patchddm", "baselines.patchddm:register"),
    ):
        if name not in names:
            mod, _, attr = target.partition(":")

            def loader(mod=mod, attr=attr):
                import importlib

                return getattr(importlib.import_module(mod), attr)

            _load_entry_point(name, loader)


def _load_entry_point(name: str, loader: Callable[[], Any]) -> None:
    try:
        fn = loader()
        out = fn() if callable(fn) and not isinstance(fn, ModelSpec) else fn
        specs = out if isinstance(out, (list, tuple)) else [out]
        for s in specs:
            if isinstance(s, ModelSpec):
                if s.source == "builtin":
                    s.source = f"entry point {name}"
                register(s)
    except Exception as exc:  # a broken plugin must not take the suite down
        _PLUGIN_ERRORS[name] = f"{type(exc).__name__}: {exc}"


def plugin_errors() -> dict[str, str]:
    """Entry points that failed to load, name -> one-line reason."""
    _load_plugins()
    return dict(_PLUGIN_ERRORS)


def list_models() -> list[str]:
    """Names of every registered model, sorted (``["idm", "patchddm", "unet", "unet-ckpt", ...]``)."""
    _load_plugins()
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` for ``name``; unknown names raise ``ValueError`` listing the valid ones."""
    _load_plugins()
    if name not in _REGISTRY:
        extra = f" (entry point failed: {_PLUGIN_ERRORS[name]})" if name in _PLUGIN_ERRORS else ""
        raise ValueError(f"unknown model {name!r}{extra}; valid models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(name: str, in_channels: int = 1, out_channels: int = 1, preset: str = "small", **overrides: Any) -> nn.Module:
    """Build model ``name`` at ``preset`` with ``overrides``; forward is ``model(x, timesteps, context=None)``."""
    spec = get_spec(name)
    cfg = spec.config(preset, **overrides)
    model = spec.build(in_channels=in_channels, out_channels=out_channels, **cfg)
    model.idmbench_spec = spec.name  # type: ignore[attr-defined]
    model.idmbench_config = dict(cfg)  # type: ignore[attr-defined]
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (elements)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
