"""The model registry: one obvious entry point, names that users type, specs that carry their defaults.

This module is a leaf (as timm's ``_registry.py``): it never imports a model. Each model module registers
its own :class:`ModelSpec` when it is imported (``register(SPEC)``), and the package imports the built-in
model modules (``idmbench/__init__.py``: :mod:`idmbench.models` and :mod:`baselines`) -- the one list of
built-ins. Third-party models come in through the entry-point group ``idmbench.models``: each entry point
names a callable that either registers a :class:`ModelSpec` itself (via :func:`register`) or returns one
(or a list of them), or names a spec object directly. A plugin that fails to load is logged as a one-line
warning naming the entry point and the reason (and kept in :func:`plugin_errors`); the other models load.

Everything that depends on how a model is trained and sampled (valid sides, the shape the network sees,
the prediction target, the throughput basis) lives in its recipe (:mod:`idmbench.recipes`); the spec's
methods delegate to it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Sequence

import torch.nn as nn

from . import recipes as _recipes
from .recipes import PREDICTION_TYPES, Patch, Recipe

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "idmbench.models"
#: the preset order the fallback policy walks, largest first
PRESET_ORDER = ("paper", "small", "tiny")
#: top-level packages whose specs count as built-in (restored when the plugins are reloaded)
_BUILTIN_PACKAGES = ("idmbench", "baselines")

_REGISTRY: dict[str, "ModelSpec"] = {}
_BUILTINS: dict[str, "ModelSpec"] = {}
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
        recipe: how the model is trained and sampled: a registered recipe's name (``"full"``, ``"patch"``,
            ``"wavelet"`` or one a plugin registered) or a :class:`~idmbench.recipes.Recipe` object (its
            name is then stored here and the object used).
        patch_fraction: default side fraction of the training patch for the ``patch`` recipe.
        description: one line for the report.
        family: groups models that are the same network (``unet`` and ``unet-ckpt``).
        source: where the spec came from (``"builtin"``, ``"entry point NAME"``).
        extra: free-form facts (library, reference).
        prediction: the prediction target (``"epsilon"`` or ``"sample"``) if it differs from the recipe's.
        attention: the attention implementation for the report (``"sdpa"``, ``"naive (materialised NxN)"``,
            ``"none"``, ``"checkerboard sdpa"``), or ``attention(config) -> str`` when a config decides.
        sources: preset name -> where its settings come from (``"*"``: any preset), for the report.
    """

    name: str
    build: Callable[..., nn.Module]
    presets: dict[str, dict[str, Any]]
    divisor: Callable[[dict[str, Any]], int]
    recipe: Any = "full"
    patch_fraction: float = 0.5
    description: str = ""
    family: str = ""
    source: str = "builtin"
    extra: dict[str, Any] = field(default_factory=dict)
    prediction: str | None = None
    attention: str | Callable[[dict[str, Any]], str] = ""
    sources: dict[str, str] = field(default_factory=dict)
    _recipe_object: Recipe | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.recipe, Recipe):
            self._recipe_object = self.recipe
            self.recipe = self.recipe.name
        if self.prediction is not None and self.prediction not in PREDICTION_TYPES:
            raise ValueError(
                f"model {self.name!r}: prediction must be one of {', '.join(PREDICTION_TYPES)}; got {self.prediction!r}"
            )

    # ----------------------------------------------------------------- config
    def config(self, preset: str = "small", **overrides: Any) -> dict[str, Any]:
        """The merged config for ``preset`` with ``overrides`` applied."""
        if preset not in self.presets:
            raise ValueError(
                f"model {self.name!r} has no preset {preset!r}; valid presets: {', '.join(sorted(self.presets))}"
            )
        cfg = dict(self.presets[preset])
        cfg.update(overrides)
        return cfg

    def get_recipe(self) -> Recipe:
        """The :class:`~idmbench.recipes.Recipe` object; an unknown name raises ``ValueError`` listing the valid ones."""
        if self._recipe_object is not None:
            return self._recipe_object
        return _recipes.get_recipe(self.recipe, self.name)

    @property
    def prediction_type(self) -> str:
        """What the network predicts: ``"epsilon"`` (the noise) or ``"sample"`` (x0)."""
        return self.prediction or self.get_recipe().prediction_type

    def patch_fraction_for(self, cfg: dict[str, Any]) -> float:
        """The training patch's side fraction, in (0, 1] (``cfg["patch_fraction"]`` or the spec's default)."""
        return _recipes.patch_fraction(self, cfg)

    # ------------------------------------------------------------------ sizes
    def valid_sides(self, cfg: dict[str, Any]) -> int:
        """The multiple every volume side must be for this model (training and sampling)."""
        return self.get_recipe().valid_sides(self, cfg)

    def check_size(self, size: Sequence[int], cfg: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the model, the size and the valid multiples if ``size`` is unusable."""
        size = tuple(int(s) for s in size)
        if len(size) != 3 or any(s <= 0 for s in size):
            raise ValueError(f"{self.name}: a volume size is three positive sides (D, H, W); got {size}")
        self.get_recipe().check_size(self, size, cfg)  # type: ignore[arg-type]

    def train_shape(self, size: Sequence[int], cfg: dict[str, Any]) -> tuple[int, ...]:
        """Spatial shape the network runs at in a training step for a volume of ``size``."""
        return self.network_shape(size, cfg, "train")

    def network_shape(self, size: Sequence[int], cfg: dict[str, Any], phase: str) -> tuple[int, ...]:
        """Channels-free spatial shape the network sees in one step of ``phase`` (``"train"``/``"sample"``):
        the volume, PatchDDM's patch in training, WDM's half-resolution sub-bands. The channel count is
        :meth:`network_channels`."""
        return self.get_recipe().network_shape(self, tuple(int(s) for s in size), cfg, phase)

    def network_channels(self, cfg: dict[str, Any], in_channels: int = 1) -> int:
        """Channels the network's first layer sees for ``in_channels`` image channels (PatchDDM: + 3
        coordinates; WDM: 8 sub-bands per channel)."""
        return self.get_recipe().network_channels(self, cfg, in_channels)

    def network_voxels(self, size: Sequence[int], cfg: dict[str, Any], phase: str) -> int:
        """Image voxels one step of ``phase`` processes per volume: the throughput basis (the patch's voxels
        for a patch model's training step; the S^3 voxels the sub-bands represent for WDM)."""
        return self.get_recipe().network_voxels(self, tuple(int(s) for s in size), cfg, phase)

    def probe_example(self, size: Sequence[int], cfg: dict[str, Any], batch: int = 1, channels: int = 1, **kw: Any) -> Patch:
        """A fixed training example (origin 0, random values) for a volume of ``size``: the model's input
        ``x0`` and extra keyword arguments for a memory probe (works on fake tensors too)."""
        return self.get_recipe().probe_example(self, tuple(int(s) for s in size), cfg, batch, channels, **kw)

    # ----------------------------------------------------------------- policy
    def fallback_preset(self, sizes: Sequence[int | Sequence[int]], preset: str) -> tuple[str, str | None]:
        """The preset to run at ``sizes`` when ``preset`` is only the default (not chosen by the user).

        If ``preset`` takes every size it is kept (note ``None``); otherwise the next smaller preset of
        :data:`PRESET_ORDER` that takes every size is returned with a one-line note; if none does,
        ``preset`` is kept (note ``None``) and the size check reports the problem.

        Args:
            sizes: cube sides (``64``) or (D, H, W) triples.
            preset: the default preset.
        """
        if preset not in self.presets:
            raise ValueError(f"model {self.name!r} has no preset {preset!r}; valid presets: {', '.join(sorted(self.presets))}")
        cubes = [(int(s),) * 3 if isinstance(s, (int,)) else tuple(int(v) for v in s) for s in sizes]

        def fits(p: str) -> bool:
            try:
                cfg = self.config(p)
                for sz in cubes:
                    self.check_size(sz, cfg)
                return True
            except ValueError:
                return False

        if fits(preset):
            return preset, None
        start = PRESET_ORDER.index(preset) + 1 if preset in PRESET_ORDER else len(PRESET_ORDER)
        for alt in PRESET_ORDER[start:]:
            if alt in self.presets and fits(alt):
                need = self.valid_sides(self.config(preset))
                return alt, (
                    f"{self.name}'s default preset {preset} needs sides that are multiples of {need}; "
                    f"using preset {alt} for {self.name} (pass --preset to choose)"
                )
        return preset, None

    # ----------------------------------------------------------------- report
    def preset_of(self, cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The preset ``cfg`` was most likely made from and the overrides on top of it (``("custom", cfg)``
        when no preset shares a value with it)."""
        best, best_n = "custom", 0
        for p, base in self.presets.items():
            n = sum(1 for k, v in base.items() if k in cfg and cfg[k] == v)
            if base and n == len(base) and len(cfg) == len(base):
                return p, {}
            if n > best_n:
                best, best_n = p, n
        if best == "custom":
            return best, dict(cfg)
        base = self.presets[best]
        return best, {k: v for k, v in cfg.items() if k not in base or base[k] != v}

    def describe(self, cfg: dict[str, Any], preset: str | None = None) -> dict[str, Any]:
        """JSON-serialisable facts for the report's methodology (``run.json["model_info"][name]``).

        Returns:
            ``{"description", "family", "settings" (the config), "preset", "overrides", "source" (where the
            settings come from), "attention", "recipe", "prediction", "network_input"}``.
        """
        if preset is None:
            preset, overrides = self.preset_of(cfg)
        else:
            base = self.presets.get(preset, {})
            overrides = {k: v for k, v in cfg.items() if k not in base or base[k] != v}
        src = self.sources.get(preset) or self.sources.get("*", "")
        if overrides and src:
            src += "; overridden: " + ", ".join(f"{k}={_jsonable(v)}" for k, v in overrides.items())
        attention = self.attention(cfg) if callable(self.attention) else self.attention
        recipe = self.get_recipe()
        return {
            "description": self.description,
            "family": self.family or self.name,
            "settings": _jsonable(dict(cfg)),
            "preset": preset,
            "overrides": _jsonable(overrides),
            "source": src,
            "attention": attention or "unspecified",
            "recipe": recipe.name,
            "prediction": self.prediction_type,
            "network_input": recipe.describe_input(self, cfg, 1),
        }


def _jsonable(v: Any) -> Any:
    """``v`` with tuples as lists and anything JSON cannot hold as its ``repr``."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    try:
        json.dumps(v)
        return v
    except TypeError:
        return repr(v)


def _is_builtin(spec: ModelSpec) -> bool:
    module = getattr(spec.build, "__module__", "") or ""
    return module.split(".")[0] in _BUILTIN_PACKAGES


def register(spec: ModelSpec, *, overwrite: bool = False) -> ModelSpec:
    """Add ``spec`` to the registry. Re-registering the same name needs ``overwrite=True``.

    Model modules call it at import (``SPEC = register(ModelSpec(...))``); plugins may call it from their
    entry point. Registering the same spec (or one with the same ``build``) again returns the registered one.
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register() takes a ModelSpec; got {type(spec).__name__}")
    if spec.name in _REGISTRY and not overwrite and _REGISTRY[spec.name] is not spec:
        existing = _REGISTRY[spec.name]
        if existing.build is spec.build:
            return existing
        raise ValueError(f"a model named {spec.name!r} is already registered (from {existing.source})")
    _REGISTRY[spec.name] = spec
    if spec.source == "builtin" and _is_builtin(spec):
        _BUILTINS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (a built-in comes back when the plugins are reloaded)."""
    _REGISTRY.pop(name, None)


def _load_plugins() -> None:
    """Load the entry points (once), then restore any built-in that is missing."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        _load_entry_point(ep.name, ep.load, getattr(ep, "value", ""))
    for name, spec in _BUILTINS.items():
        _REGISTRY.setdefault(name, spec)


def _load_entry_point(name: str, loader: Callable[[], Any], target: str = "") -> None:
    try:
        fn = loader()
        out = fn() if callable(fn) and not isinstance(fn, ModelSpec) else fn
        specs = out if isinstance(out, (list, tuple)) else ([] if out is None else [out])
        for s in specs:
            if not isinstance(s, ModelSpec):
                raise TypeError(f"returned {type(s).__name__}, expected a ModelSpec, a list of them or None")
            if _REGISTRY.get(s.name) is s:
                continue  # already registered (a built-in that is also declared as an entry point)
            if s.source == "builtin":
                s = dataclasses.replace(s, source=f"entry point {name}")
            register(s)
    except Exception as exc:  # a broken plugin must not take the suite down: record it and say so
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        _PLUGIN_ERRORS[name] = reason
        where = f" ({target})" if target else ""
        logger.warning("model plugin %r%s from entry-point group %s failed to load: %s", name, where, ENTRY_POINT_GROUP, reason)


def plugin_errors() -> dict[str, str]:
    """Entry points that failed to load, name -> one-line reason."""
    _load_plugins()
    return dict(_PLUGIN_ERRORS)


def list_models() -> list[str]:
    """Names of every registered model, sorted (``["idm", "patchddm", "unet", "unet-ckpt", "wdm", ...]``).

    A plugin that fails to load is left out with a one-line warning on the ``idmbench.registry`` logger.
    """
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
