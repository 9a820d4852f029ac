"""The model registry: names, presets, errors, and third-party models through the ``idmbench.models`` entry points."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch.nn as nn

import idmbench
from idmbench import registry
from idmbench.registry import ModelSpec

BASELINES = {"unet", "unet-ckpt", "patchddm"}


class Net(nn.Module):
    def __init__(self, in_channels=1, out_channels=1, width=4):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 1)
        self.width = width

    def forward(self, x, timesteps, context=None):
        return self.conv(x)


def make_spec(name: str) -> ModelSpec:
    return ModelSpec(name=name, build=Net, presets={"small": {"width": 4}, "tiny": {"width": 2}}, divisor=lambda cfg: 2)


class FakeEntryPoint:
    """What ``importlib.metadata.entry_points(group=...)`` yields: a ``name`` and a ``load()``."""

    def __init__(self, name, target):
        self.name, self.group, self._target = name, registry.ENTRY_POINT_GROUP, target

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


@pytest.fixture
def fresh_registry(monkeypatch):
    """A copy of the registry whose plugins load again on the next call; the real one is restored afterwards."""
    idmbench.list_models()  # make sure the built-ins are in before copying
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_PLUGIN_ERRORS", {})
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)

    def install(*eps):
        monkeypatch.setattr(metadata, "entry_points", lambda group=None, **kw: list(eps) if group == registry.ENTRY_POINT_GROUP else [])

    return install


def test_list_models_is_sorted_and_holds_the_baselines():
    names = idmbench.list_models()
    assert names == sorted(names)
    assert BASELINES <= set(names)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        idmbench.create_model("unet3d")
    msg = str(e.value)
    assert "unknown model 'unet3d'" in msg
    for name in idmbench.list_models():
        assert name in msg


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"model 'unet' has no preset 'huge'; valid presets: paper, small, tiny"):
        idmbench.create_model("unet", preset="huge")


def test_create_model_applies_overrides_and_stamps_spec_and_config():
    m = idmbench.create_model("unet", preset="tiny", num_res_blocks=2)
    assert m.idmbench_spec == "unet"
    assert m.idmbench_config["num_res_blocks"] == 2 and m.idmbench_config["channels"] == (4, 8, 12)
    assert tuple(m.num_res_blocks) == (2, 2, 2)
    assert idmbench.get_spec("unet").presets["tiny"]["num_res_blocks"] == 1  # the preset itself is untouched


def test_count_parameters_counts_trainable_elements():
    net = Net()
    assert idmbench.count_parameters(net) == 2
    net.conv.bias.requires_grad_(False)
    assert idmbench.count_parameters(net) == 1


def test_baselines_come_in_through_their_entry_points(fresh_registry):
    from baselines import patchddm, unet

    fresh_registry(
        FakeEntryPoint("unet", unet.register),
        FakeEntryPoint("unet-ckpt", unet.register_ckpt),
        FakeEntryPoint("patchddm", patchddm.register),
    )
    for name in BASELINES:
        registry.unregister(name)
    assert BASELINES <= set(idmbench.list_models())
    assert registry.plugin_errors() == {}
    assert idmbench.get_spec("unet").source.startswith("entry point")


def test_without_installed_entry_points_the_baselines_still_load(fresh_registry):
    """A source checkout without ``pip install`` has no entry points: the registry imports the baselines itself."""
    fresh_registry()
    for name in BASELINES:
        registry.unregister(name)
    assert BASELINES <= set(idmbench.list_models())


def test_third_party_entry_points_returning_registering_or_listing_specs(fresh_registry):
    def returns_one():
        return make_spec("ext-one")

    def registers_itself():
        idmbench.register(make_spec("ext-self"))

    fresh_registry(
        FakeEntryPoint("ext-one", returns_one),
        FakeEntryPoint("ext-self", registers_itself),
        FakeEntryPoint("ext-list", lambda: [make_spec("ext-a"), make_spec("ext-b")]),
        FakeEntryPoint("ext-spec", make_spec("ext-object")),  # an entry point may name a spec object directly
    )
    names = idmbench.list_models()
    assert {"ext-one", "ext-self", "ext-a", "ext-b", "ext-object"} <= set(names)
    assert BASELINES <= set(names)  # the built-in fallbacks still come in
    m = idmbench.create_model("ext-one", preset="tiny", in_channels=2, out_channels=3)
    assert isinstance(m, Net) and m.width == 2 and m.conv.in_channels == 2 and m.conv.out_channels == 3
    assert idmbench.get_spec("ext-one").source == "entry point ext-one"


def test_a_broken_plugin_is_reported_not_fatal(fresh_registry):
    fresh_registry(
        FakeEntryPoint("broken", ImportError("No module named 'nowhere'")),
        FakeEntryPoint("raises", lambda: 1 / 0),
        FakeEntryPoint("fine", lambda: make_spec("fine")),
    )
    assert "fine" in idmbench.list_models()
    errors = registry.plugin_errors()
    assert errors["broken"] == "ImportError: No module named 'nowhere'"
    assert errors["raises"].startswith("ZeroDivisionError")
    with pytest.raises(ValueError, match=r"unknown model 'broken' \(entry point failed: ImportError: No module named 'nowhere'\); valid models: .*fine"):
        idmbench.get_spec("broken")


def test_register_refuses_a_clash_unless_overwriting(fresh_registry):
    fresh_registry()
    a = idmbench.register(make_spec("clash"))
    assert idmbench.register(a) is a  # the same spec again is fine
    with pytest.raises(ValueError, match="a model named 'clash' is already registered"):
        idmbench.register(ModelSpec(name="clash", build=lambda **k: Net(), presets={}, divisor=lambda c: 1))
    b = ModelSpec(name="clash", build=lambda **k: Net(), presets={}, divisor=lambda c: 1)
    assert idmbench.register(b, overwrite=True) is b
    with pytest.raises(TypeError, match="register\\(\\) takes a ModelSpec"):
        idmbench.register("clash")


def test_check_size_and_valid_sides():
    full = make_spec("full-model")
    full.check_size((4, 8, 16), {})
    with pytest.raises(ValueError, match=r"full-model needs every side divisible by 2; got \(4, 8, 5\); valid sides: 2, 4, 8"):
        full.check_size((4, 8, 5), {})
    with pytest.raises(ValueError, match=r"three positive sides"):
        full.check_size((4, 8), {})
    patch = ModelSpec(name="patchy", build=Net, presets={}, divisor=lambda c: 4, recipe="patch", patch_fraction=0.5)
    assert patch.valid_sides({}) == 8
    assert patch.train_shape((16, 32, 8), {}) == (8, 16, 4)
    assert patch.train_shape((16, 16, 16), {"patch_fraction": 0.25}) == (4, 4, 4)
    with pytest.raises(ValueError, match=r"patchy needs .*got \(12, 16, 16\); valid sides are multiples of 8"):
        patch.check_size((12, 16, 16), {})
    with pytest.raises(ValueError, match=r"patchy: patch_fraction must be in \(0, 1\]; got 0.0"):
        patch.check_size((16, 16, 16), {"patch_fraction": 0.0})
