"""The model registry: names, presets, errors, and third-party models through the ``idmbench.models`` entry points."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch.nn as nn

import idmbench
from idmbench import registry
from idmbench.registry import ModelSpec

BASELINES = {"unet", "unet-ckpt", "patchddm", "wdm"}


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

    from baselines import wdm

    fresh_registry(
        FakeEntryPoint("unet", unet.register),
        FakeEntryPoint("unet-ckpt", unet.register_ckpt),
        FakeEntryPoint("patchddm", patchddm.register),
        FakeEntryPoint("wdm", wdm.register),
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


# ------------------------------------------------------------------------------- issue 14.2 / 14.3 / 11


def test_list_models_names_every_built_in():
    assert {"idm", "patchddm", "unet", "unet-ckpt", "wdm"} <= set(idmbench.list_models())
    assert all(idmbench.get_spec(n).source == "builtin" for n in ("idm", "patchddm", "unet", "unet-ckpt", "wdm"))


def test_a_failing_plugin_is_logged_as_one_warning_line(fresh_registry, caplog):
    fresh_registry(FakeEntryPoint("broken", ImportError("No module named 'nowhere'")), FakeEntryPoint("odd", lambda: 42))
    with caplog.at_level("WARNING", logger="idmbench.registry"):
        names = idmbench.list_models()
    assert "broken" not in names and "odd" not in names
    msgs = [r.getMessage() for r in caplog.records if r.name == "idmbench.registry"]
    assert len(msgs) == 2 and all("\n" not in m for m in msgs)
    assert "'broken'" in msgs[0] and "ImportError: No module named 'nowhere'" in msgs[0]
    assert "'odd'" in msgs[1] and "returned int, expected a ModelSpec" in msgs[1]
    caplog.clear()
    idmbench.list_models()  # loaded once: no repeated warnings
    assert not [r for r in caplog.records if r.name == "idmbench.registry"]


def _project_imports(path) -> set[str]:
    """Modules of this project a file imports (absolute ``idmbench``/``baselines`` names, relative imports resolved)."""
    import ast

    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in ("idmbench", "baselines")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = "idmbench" + ("." + node.module if node.module else "")
                out |= {base} if node.module else {f"idmbench.{a.name}" for a in node.names}
            elif node.module and node.module.split(".")[0] in ("idmbench", "baselines"):
                out.add(node.module)
    return out


def test_registry_and_recipes_are_leaves():
    """timm's rule: the registry never imports a model (nor anything that does); recipes import torch only."""
    from pathlib import Path

    pkg = Path(idmbench.__file__).parent
    assert _project_imports(pkg / "registry.py") <= {"idmbench.recipes"}
    assert _project_imports(pkg / "recipes.py") == set()


def test_built_ins_are_listed_once_not_as_entry_points():
    """One source of truth: the package imports the model modules; pyproject declares no built-in entry point."""
    import tomllib
    from pathlib import Path

    root = Path(idmbench.__file__).parent.parent
    eps = tomllib.loads((root / "pyproject.toml").read_text())["project"].get("entry-points", {}).get(registry.ENTRY_POINT_GROUP, {})
    assert not set(eps) & {"idm", "unet", "unet-ckpt", "patchddm", "wdm"}
    registry_src = (Path(idmbench.__file__).parent / "registry.py").read_text()
    assert "baselines.unet" not in registry_src and "baselines.patchddm" not in registry_src


def test_specs_take_recipe_objects_and_plugin_recipes_need_no_other_edit(monkeypatch):
    """A latent-style recipe (the network at S/4, 4 channels) registered by a plugin: the spec's sizes,
    shapes, voxels and description follow it with no change elsewhere."""
    from idmbench import recipes

    class Quarter(recipes.Recipe):
        name = "quarter"
        prediction_type = "sample"

        def valid_sides(self, spec, cfg):
            return 4 * self.divisor(spec, cfg)

        def check_size(self, spec, size, cfg):
            m = self.valid_sides(spec, cfg)
            if any(s % m for s in size):
                raise ValueError(f"{spec.name} needs every side divisible by {m}; got {size}")

        def network_shape(self, spec, size, cfg, phase):
            return tuple(s // 4 for s in size)

        def network_channels(self, spec, cfg, in_channels=1):
            return 4

    monkeypatch.setitem(recipes.RECIPES, "quarter", None)  # removed after the test
    recipes.register_recipe(Quarter(), overwrite=True)
    by_name = ModelSpec(name="lat", build=Net, presets={"small": {}}, divisor=lambda c: 2, recipe="quarter")
    by_object = ModelSpec(name="lat2", build=Net, presets={"small": {}}, divisor=lambda c: 2, recipe=Quarter())
    for spec in (by_name, by_object):
        assert spec.recipe == "quarter" and spec.prediction_type == "sample"
        assert spec.valid_sides({}) == 8 and spec.network_shape((32, 32, 64), {}, "train") == (8, 8, 16)
        assert spec.network_channels({}) == 4 and spec.network_voxels((32, 32, 32), {}, "sample") == 32**3
        with pytest.raises(ValueError, match=r"needs every side divisible by 8; got \(32, 32, 12\)"):
            spec.check_size((32, 32, 12), {})
    with pytest.raises(ValueError, match=r"unknown recipe 'nope'; valid: full, patch, wavelet"):
        ModelSpec(name="x", build=Net, presets={}, divisor=lambda c: 1, recipe="nope").valid_sides({})
    with pytest.raises(ValueError, match=r"prediction must be one of epsilon, sample; got 'v'"):
        ModelSpec(name="x", build=Net, presets={}, divisor=lambda c: 1, prediction="v")


def test_fallback_preset_policy():
    pd = idmbench.get_spec("patchddm")
    preset, note = pd.fallback_preset([64, 128, 256], "paper")
    assert preset == "small"
    assert note == ("patchddm's default preset paper needs sides that are multiples of 128; "
                    "using preset small for patchddm (pass --preset to choose)")
    assert pd.fallback_preset([128, 256], "paper") == ("paper", None)
    assert pd.fallback_preset([(256, 256, 128)], "paper") == ("paper", None)
    assert idmbench.get_spec("unet").fallback_preset([64, 128], "paper") == ("paper", None)
    assert pd.fallback_preset([12], "small") == ("small", None)  # nothing fits: the size check will say why
    with pytest.raises(ValueError, match=r"model 'patchddm' has no preset 'huge'; valid presets: paper, small, tiny"):
        pd.fallback_preset([64], "huge")


@pytest.mark.parametrize("name", ["idm", "unet", "unet-ckpt", "patchddm", "wdm"])
def test_describe_is_json_serialisable_and_complete(name):
    import json

    spec = idmbench.get_spec(name)
    info = spec.describe(spec.config("small"))
    assert json.loads(json.dumps(info)) == info
    assert set(info) >= {"description", "family", "settings", "source", "attention", "recipe", "prediction", "network_input"}
    assert info["preset"] == "small" and info["overrides"] == {} and info["recipe"] == spec.recipe
    assert info["prediction"] in ("epsilon", "sample") and info["description"] == spec.description
    if name != "idm":
        assert info["source"] and info["attention"] in ("sdpa", "none")
