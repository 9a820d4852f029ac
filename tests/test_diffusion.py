"""The shared diffusion step (``idmbench.diffusion``): schedules, recipes, loss, training step, DDIM sampling.

Uses a tiny 1x1x1-conv "model" so each property is checked in milliseconds and independently of any network.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import idmbench
from idmbench import diffusion as D
from idmbench.registry import ModelSpec


class PointwiseModel(nn.Module):
    """A 1x1x1 conv with MONAI's forward signature; records what it is called with."""

    def __init__(self, channels: int = 1, extra: int = 0):
        super().__init__()
        self.conv = nn.Conv3d(channels + extra, channels, 1)
        self.calls: list[dict] = []

    def forward(self, x, timesteps, context=None, coords=None):
        self.calls.append({"x": x.detach().clone(), "timesteps": timesteps.clone(), "coords": coords})
        h = x if coords is None else torch.cat([x, coords.to(x.dtype)], 1)
        return self.conv(h)


class Identity(nn.Module):
    """eps_hat = x_t, to read back exactly what the step fed the network."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, timesteps, context=None, **kw):
        return x + 0 * self.dummy


FULL = ModelSpec(name="pointwise", build=lambda **k: PointwiseModel(), presets={"tiny": {}}, divisor=lambda c: 2)
PATCH = ModelSpec(name="pointwise-patch", build=lambda **k: PointwiseModel(extra=3), presets={"tiny": {}}, divisor=lambda c: 2, recipe="patch")


def test_train_scheduler_is_ddpm_1000_linear_betas_epsilon():
    s = D.make_train_scheduler()
    assert s.num_train_timesteps == 1000
    assert s.prediction_type == "epsilon"
    assert math.isclose(float(s.betas[0]), 1e-4, rel_tol=1e-5) and math.isclose(float(s.betas[-1]), 2e-2, rel_tol=1e-5)
    assert torch.allclose(s.betas[1:] - s.betas[:-1], torch.full((999,), (2e-2 - 1e-4) / 999), atol=1e-8)  # linear


def test_sample_scheduler_is_ddim_with_n_descending_steps():
    s = D.make_sample_scheduler(5)
    assert type(s).__name__ == "DDIMScheduler"
    t = [int(v) for v in s.timesteps]
    assert len(t) == 5 and t == sorted(t, reverse=True) and t[-1] == 0


def test_global_coordinates():
    c = D.global_coordinates((4, 5, 1), batch=2)
    assert c.shape == (2, 3, 4, 5, 1)
    assert torch.allclose(c[0, 0, :, 0, 0], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]), atol=1e-7)
    assert torch.allclose(c[0, 1, 0, :, 0], torch.linspace(-1, 1, 5))
    assert torch.equal(c[:, 2], torch.zeros(2, 4, 5, 1))  # an axis of length 1 sits at 0
    assert torch.equal(c[0, 0, :, 3, 0], c[0, 0, :, 0, 0])  # each channel varies along its own axis only
    assert c.min() == -1 and c.max() == 1
    assert c.dtype == torch.float32 and D.global_coordinates((2, 2, 2), dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="three positive sides"):
        D.global_coordinates((4, 4))


def test_full_recipe_passes_the_volume_through():
    x0 = torch.randn(2, 1, 4, 4, 4)
    ex = D.training_example(FULL, x0)
    assert ex.x0 is x0 and ex.origin == (0, 0, 0) and ex.model_kwargs == {}


def test_patch_recipe_crops_fraction_and_coordinates():
    x0 = torch.randn(1, 1, 8, 16, 8)
    ex = D.training_example(PATCH, x0, {"patch_fraction": 0.5}, torch.Generator().manual_seed(0))
    assert ex.x0.shape == (1, 1, 4, 8, 4)
    assert ex.model_kwargs["coords"].shape == (1, 3, 4, 8, 4)
    o = ex.origin
    assert torch.equal(ex.x0, x0[:, :, o[0] : o[0] + 4, o[1] : o[1] + 8, o[2] : o[2] + 4])


def test_training_example_checks_the_size_first():
    with pytest.raises(ValueError, match=r"pointwise needs every side divisible by 2; got \(4, 4, 5\)"):
        D.training_example(FULL, torch.zeros(1, 1, 4, 4, 5))
    with pytest.raises(ValueError, match=r"pointwise: a training batch is \(B, C, D, H, W\); got shape \(1, 4, 4, 4\)"):
        D.training_example(FULL, torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match=r"pointwise-patch: patch_fraction must be in \(0, 1\]; got 2"):
        D.training_example(PATCH, torch.zeros(1, 1, 8, 8, 8), {"patch_fraction": 2})


def test_unknown_recipe_is_rejected_and_plugins_can_bring_their_own(monkeypatch):
    odd = ModelSpec(name="odd", build=lambda **k: PointwiseModel(), presets={}, divisor=lambda c: 1, recipe="half-batch")
    with pytest.raises(ValueError, match=r"odd: unknown recipe 'half-batch'; valid: full, patch"):
        D.training_example(odd, torch.zeros(2, 1, 4, 4, 4))

    def first_sample_only(x0, spec, cfg, generator=None):
        return D.Patch(x0[:1], (0, 0, 0), {"coords": torch.zeros(1, 3, *x0.shape[2:])})

    monkeypatch.setitem(D.RECIPES, "half-batch", None)  # restored after the test
    D.register_recipe("half-batch", first_sample_only, overwrite=True)
    with pytest.raises(ValueError, match="already registered"):
        D.register_recipe("half-batch", D.full_volume_example)
    model = PointwiseModel(extra=3)
    D.diffusion_loss(model, torch.randn(2, 1, 4, 4, 4), D.make_train_scheduler(), spec=odd, generator=torch.Generator().manual_seed(0))
    call = model.calls[-1]
    assert call["x"].shape[0] == 1 and call["coords"].shape == (1, 3, 4, 4, 4)


def test_loss_is_the_epsilon_mse_of_add_noise():
    """With eps_hat = x_t the loss must be exactly MSE(sqrt(a) x0 + sqrt(1 - a) eps, eps) at the given t."""
    sched = D.make_train_scheduler()
    x0 = torch.randn(2, 1, 4, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 999])
    loss = D.diffusion_loss(Identity(), x0, sched, spec=FULL, noise=noise, timesteps=t)
    a = sched.alphas_cumprod[t].view(2, 1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    assert torch.allclose(loss, F.mse_loss(x_t, noise))
    assert loss.ndim == 0 and loss.dtype == torch.float32


def test_loss_is_reproducible_with_a_generator_and_random_without():
    sched = D.make_train_scheduler()
    torch.manual_seed(0)
    model = PointwiseModel()
    x0 = torch.randn(2, 1, 4, 4, 4)
    a = D.diffusion_loss(model, x0, sched, spec=FULL, generator=torch.Generator().manual_seed(5))
    b = D.diffusion_loss(model, x0, sched, spec=FULL, generator=torch.Generator().manual_seed(5))
    c = D.diffusion_loss(model, x0, sched, spec=FULL, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    t = model.calls[-1]["timesteps"]
    assert t.shape == (2,) and t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) < 1000


def test_explicit_noise_must_match_the_training_example():
    x0 = torch.randn(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"noise must have the training example's shape \(1, 1, 4, 4, 4\)"):
        D.diffusion_loss(PointwiseModel(extra=3), x0, D.make_train_scheduler(), spec=PATCH, cfg={"patch_fraction": 0.5}, noise=torch.randn_like(x0))


def test_training_step_updates_parameters_and_returns_the_loss():
    torch.manual_seed(0)
    model = PointwiseModel()
    opt = D.make_optimizer(model, lr=1e-2)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 1e-2
    before = [p.detach().clone() for p in model.parameters()]
    x0 = torch.randn(2, 1, 4, 4, 4)
    loss = D.training_step(model, opt, x0, D.make_train_scheduler(), spec=FULL, generator=torch.Generator().manual_seed(0))
    assert isinstance(loss, float) and math.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    ref = D.diffusion_loss(model, x0, D.make_train_scheduler(), spec=FULL, generator=torch.Generator().manual_seed(0))
    assert ref.item() != loss  # the step changed the model; same batch, new loss


def test_training_step_fits_a_fixed_batch():
    torch.manual_seed(0)
    model = PointwiseModel()
    opt = D.make_optimizer(model, lr=5e-2)
    x0 = torch.randn(1, 1, 4, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([999])  # x_t is almost the noise: a 1x1x1 conv can learn eps_hat ~ x_t
    sched = D.make_train_scheduler()
    losses = [D.training_step(model, opt, x0, sched, spec=FULL, noise=noise, timesteps=t) for _ in range(60)]
    assert losses[-1] < 0.1 * losses[0]


def test_training_step_under_bfloat16_autocast():
    model = PointwiseModel()
    loss = D.training_step(model, D.make_optimizer(model), torch.randn(1, 1, 4, 4, 4), D.make_train_scheduler(), spec=FULL, autocast_dtype=torch.bfloat16)
    assert math.isfinite(loss)


def test_cfg_defaults_to_the_config_create_model_stamped():
    model = PointwiseModel(extra=3)
    model.idmbench_config = {"patch_fraction": 0.25}
    D.diffusion_loss(model, torch.randn(1, 1, 16, 16, 16), D.make_train_scheduler(), spec=PATCH)
    assert model.calls[-1]["x"].shape == (1, 1, 4, 4, 4)
    D.diffusion_loss(model, torch.randn(1, 1, 16, 16, 16), D.make_train_scheduler(), spec=PATCH, cfg={})
    assert model.calls[-1]["x"].shape == (1, 1, 8, 8, 8)  # an explicit cfg wins; spec default 0.5


def test_ddim_sample_calls_the_model_once_per_step_on_the_whole_volume():
    torch.manual_seed(0)
    model = PointwiseModel()
    out = D.sample(model, (2, 1, 4, 6, 8), num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 4, 6, 8) and torch.isfinite(out).all()
    ts = [c["timesteps"] for c in model.calls]
    assert len(ts) == 4 and all(t.shape == (2,) and t.dtype == torch.long for t in ts)
    assert [int(t[0]) for t in ts] == [int(v) for v in D.make_sample_scheduler(4).timesteps]
    assert all(c["x"].shape == (2, 1, 4, 6, 8) and c["coords"] is None for c in model.calls)
    again = D.sample(model, (2, 1, 4, 6, 8), num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # deterministic (eta = 0) for a fixed generator


def test_ddim_sample_max_steps_and_zero_model_recovers_the_ddim_update():
    model = PointwiseModel()
    D.sample(model, (1, 1, 4, 4, 4), num_inference_steps=10, max_steps=1)
    assert len(model.calls) == 1
    # a model predicting zero noise: DDIM's x0 estimate is x_t / sqrt(a_t), and a single step (eta = 0)
    # lands on it (the final alpha is 1)
    zero = PointwiseModel()
    nn.init.zeros_(zero.conv.weight)
    nn.init.zeros_(zero.conv.bias)
    sched = D.make_sample_scheduler(1)
    x = torch.randn(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    out = D.sample(zero, (1, 1, 4, 4, 4), scheduler=sched, generator=torch.Generator().manual_seed(0))
    a_t = sched.alphas_cumprod[int(sched.timesteps[0])]
    assert torch.allclose(out, x / a_t.sqrt(), rtol=1e-5)


def test_registered_models_run_the_shared_step():
    """The shared step works with the real registry entries (by name) as well as with a spec object."""
    for name in ("unet", "patchddm"):
        model = idmbench.create_model(name, preset="tiny")
        loss = D.training_step(model, D.make_optimizer(model), torch.randn(1, 1, 8, 8, 8), D.make_train_scheduler(), spec=name, generator=torch.Generator().manual_seed(0))
        assert math.isfinite(loss)


# ------------------------------------------------------------------- prediction targets, x0, recipes (issue 9, 14.3)

X0 = ModelSpec(name="pointwise-x0", build=lambda **k: PointwiseModel(), presets={"tiny": {}}, divisor=lambda c: 2, prediction="sample")
WAVE = ModelSpec(name="pointwise-wave", build=lambda **k: PointwiseModel(), presets={"tiny": {}}, divisor=lambda c: 2, recipe="wavelet")


def test_schedulers_take_the_prediction_type():
    assert D.make_sample_scheduler(3, prediction_type="sample").prediction_type == "sample"
    assert D.make_train_scheduler(prediction_type="sample").prediction_type == "sample"
    with pytest.raises(ValueError, match=r"unknown prediction_type 'v'; valid: epsilon, sample"):
        D.make_sample_scheduler(3, prediction_type="v")


def test_x0_models_regress_the_clean_example():
    """With out = x_t the loss must be exactly MSE(x_t, x0) for an x0-prediction spec."""
    sched = D.make_train_scheduler()
    x0 = torch.randn(2, 1, 4, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([3, 600])
    loss = D.diffusion_loss(Identity(), x0, sched, spec=X0, noise=noise, timesteps=t)
    x_t = sched.add_noise(x0, noise, t)
    assert torch.allclose(loss, F.mse_loss(x_t, x0))
    assert X0.prediction_type == "sample" and FULL.prediction_type == "epsilon"


def test_the_wavelet_recipe_diffuses_and_regresses_the_encoded_volume():
    sched = D.make_train_scheduler()
    x0 = torch.randn(1, 1, 4, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([100])
    z0 = D.RECIPES["wavelet"].encode(x0)
    assert not torch.allclose(z0, x0)
    loss = D.diffusion_loss(Identity(), x0, sched, spec=WAVE, noise=noise, timesteps=t)
    assert torch.allclose(loss, F.mse_loss(sched.add_noise(z0, noise, t), z0))
    assert torch.allclose(D.noisy_input(x0, noise, t, sched, spec=WAVE), sched.add_noise(z0, noise, t))


class Oracle(nn.Module):
    """Returns the true noise (epsilon) or the true clean state (x0), to check predict_x0 exactly."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, x, timesteps, context=None):
        return self.target


@pytest.mark.parametrize("spec", [FULL, X0, WAVE], ids=["epsilon", "x0", "wavelet"])
def test_predict_x0_recovers_the_clean_volume_from_a_perfect_model(spec):
    sched = D.make_train_scheduler()
    x0 = torch.randn(2, 1, 4, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([10, 900])
    x_t = D.noisy_input(x0, noise, t, sched, spec=spec)
    target = noise if spec.prediction_type == "epsilon" else spec.get_recipe().encode(x0)
    x0_hat = D.predict_x0(Oracle(target), x_t, t, sched, spec=spec)
    assert torch.allclose(x0_hat, x0, atol=1e-9), float((x0_hat - x0).abs().max())


def test_sample_uses_the_specs_prediction_type_and_data_map():
    """An x0 model predicting 0: the single DDIM step (final alpha 1) lands on x0_hat = 0, mapped back (0)."""
    zero = PointwiseModel()
    nn.init.zeros_(zero.conv.weight)
    nn.init.zeros_(zero.conv.bias)
    out = D.sample(zero, (1, 1, 4, 4, 4), num_inference_steps=1, spec=X0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, torch.zeros_like(out))
    eps = D.sample(zero, (1, 1, 4, 4, 4), num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert eps.abs().sum() > 0  # the same model read as epsilon-prediction: x_t / sqrt(a_t)
    with pytest.raises(ValueError, match=r"sample: the scheduler predicts 'epsilon' but pointwise-x0 predicts 'sample'"):
        D.sample(zero, (1, 1, 4, 4, 4), spec=X0, scheduler=D.make_sample_scheduler(2))


def test_register_recipe_takes_objects_and_functions(monkeypatch):
    from idmbench.recipes import FullVolume

    class Mine(FullVolume):
        name = "mine"

    monkeypatch.setitem(D.RECIPES, "mine", None)
    r = D.register_recipe(Mine(), overwrite=True)
    assert D.RECIPES["mine"] is r
    with pytest.raises(ValueError, match=r"a recipe named 'mine' is already registered"):
        D.register_recipe(Mine())
    spec = ModelSpec(name="m", build=lambda **k: PointwiseModel(), presets={}, divisor=lambda c: 1, recipe="mine")
    assert D.training_example(spec, torch.zeros(1, 1, 2, 2, 2)).x0.shape == (1, 1, 2, 2, 2)


def test_patch_coordinates_equal_the_slice_of_the_global_grid():
    from idmbench.recipes import patch_coordinates

    full = D.global_coordinates((6, 5, 7), 2)
    part = patch_coordinates((6, 5, 7), (2, 1, 3), (3, 4, 4), 2)
    assert torch.equal(part, full[:, :, 2:5, 1:5, 3:7])
    with pytest.raises(ValueError, match="does not fit in the volume"):
        patch_coordinates((6, 5, 7), (4, 0, 0), (3, 4, 4))
