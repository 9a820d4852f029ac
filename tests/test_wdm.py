"""``wdm`` (WDM-3D): the orthonormal Haar transform, the wavelet recipe's data map, what the UNet sees, the
shared training step with x0 as the target, DDIM sampling with an x0 model, MONAI interop, sizes and errors.
CPU, volumes <= 32^3; the ``paper`` presets are predicted on fake tensors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler

import idmbench
from baselines.wdm import haar_dwt3d, haar_idwt3d, haar_kernel
from idmbench import diffusion as D
from idmbench.recipes import RECIPES, WaveletRecipe


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The 2 CPU cores are shared: one intra-op thread is faster and steadier than two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------- the transform


def test_dwt_then_idwt_reproduces_the_volume_in_float64():
    x = torch.randn(2, 3, 8, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = haar_dwt3d(x)
    assert y.shape == (2, 24, 4, 6, 8) and y.dtype == torch.float64
    assert rel(haar_idwt3d(y), x) <= 1e-12
    z = torch.randn(1, 8, 3, 3, 3, dtype=torch.float64)
    assert rel(haar_dwt3d(haar_idwt3d(z)), z) <= 1e-12  # a bijection both ways


def test_the_transform_is_orthonormal_and_preserves_the_l2_norm():
    x = torch.randn(3, 2, 8, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert abs(float(haar_dwt3d(x).norm() / x.norm()) - 1.0) <= 1e-12
    k = haar_kernel(1, dtype=torch.float64).reshape(8, 8)
    assert torch.allclose(k @ k.T, torch.eye(8, dtype=torch.float64), atol=1e-15, rtol=0)
    # so i.i.d. N(0, 1) noise stays i.i.d. N(0, 1): its covariance is K I K^T = I


def test_sub_bands_are_the_haar_filters_of_each_2x2x2_block():
    """Channel 0 is the low-pass band (block sum / sqrt(8)); channel 4 the high-pass along D; per image channel."""
    x = torch.randn(1, 2, 4, 4, 4, dtype=torch.float64)
    y = haar_dwt3d(x)
    blk = x[:, :, :2, :2, :2]
    assert torch.allclose(y[0, 0, 0, 0, 0], blk[0, 0].sum() / math.sqrt(8))
    assert torch.allclose(y[0, 8, 0, 0, 0], blk[0, 1].sum() / math.sqrt(8))  # channel 1's LLL is sub-band 8
    assert torch.allclose(y[0, 4, 0, 0, 0], (blk[0, 0, 0] - blk[0, 0, 1]).sum() / math.sqrt(8))


def test_wavelet_data_map_is_wdms_lll_over_three_and_exactly_invertible():
    """encode(x) = IDWT(cat(LLL / 3, other bands) of DWT(x)): WDM-3D's x_start in image space; decode inverts it."""
    x = torch.randn(2, 1, 8, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    r = RECIPES["wavelet"]
    bands = haar_dwt3d(x)
    bands[:, 0] /= 3.0
    assert rel(r.encode(x), haar_idwt3d(bands)) <= 1e-12
    assert rel(r.decode(r.encode(x)), x) <= 1e-12
    assert rel(WaveletRecipe(lowpass_scale=1.0).encode(x), x) <= 1e-15


# -------------------------------------------------------------------------------------------- the model


def test_the_unet_sees_eight_sub_bands_at_half_resolution():
    torch.manual_seed(0)
    model = idmbench.create_model("wdm", preset="tiny", in_channels=2, out_channels=2)
    seen = []
    model.unet.conv_in.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.05)
    x = torch.randn(1, 2, 16, 16, 16)
    t = torch.tensor([400])
    out = model(x, t)
    assert seen == [(1, 16, 8, 8, 8)] == [(1,) + model.network_shape((16, 16, 16))]
    assert out.shape == x.shape
    with torch.no_grad():  # forward = IDWT(UNet(DWT(x)))
        assert torch.allclose(out, haar_idwt3d(model.unet(haar_dwt3d(x), t)), atol=1e-6)


def test_spec_reports_shape_channels_voxels_and_target():
    spec = idmbench.get_spec("wdm")
    cfg = spec.config("paper")
    assert spec.recipe == "wavelet" and spec.prediction_type == "sample"
    assert spec.network_shape((256,) * 3, cfg, "train") == spec.network_shape((256,) * 3, cfg, "sample") == (128, 128, 128)
    assert spec.network_channels(cfg, in_channels=1) == 8 and spec.network_channels(cfg, in_channels=4) == 32
    assert spec.network_voxels((256,) * 3, cfg, "train") == 256**3  # the image voxels the sub-bands represent
    assert spec.valid_sides(cfg) == 64 and spec.valid_sides(spec.config("paper128")) == 32
    assert spec.valid_sides(spec.config("small")) == 32 and spec.valid_sides(spec.config("tiny")) == 8
    info = spec.describe(cfg)
    json.dumps(info)
    assert info["prediction"] == "sample" and info["recipe"] == "wavelet" and info["attention"] == "none"
    assert "(8 x 1 = 8, S/2, S/2, S/2)" in info["network_input"]
    assert "run.sh" in info["source"] and "ours_unet_256" in info["source"] and info["preset"] == "paper"


@pytest.mark.parametrize("size", [(16, 16, 12), (20, 16, 16)])
def test_bad_sides_give_a_one_line_error_naming_the_divisor(size):
    spec = idmbench.get_spec("wdm")
    with pytest.raises(ValueError) as e:
        spec.check_size(size, spec.config("tiny"))
    msg = str(e.value)
    assert msg.startswith("wdm needs every side divisible by 8") and str(size) in msg and "valid sides: 8, 16, 32" in msg
    assert "\n" not in msg
    model = idmbench.create_model("wdm", preset="tiny")
    with pytest.raises(ValueError) as e2:
        model(torch.randn((1, 1) + size), torch.tensor([1]))
    assert str(e2.value).startswith("wdm needs every side divisible by 8") and "\n" not in str(e2.value)
    with pytest.raises(ValueError, match=r"wdm needs every side divisible by 8"):
        D.training_step(model, D.make_optimizer(model), torch.zeros((1, 1) + size), D.make_train_scheduler(), spec="wdm")


# ------------------------------------------------------------------------------------- training / sampling


def test_training_step_regresses_the_encoded_x0_at_16():
    """The shared step at 16^3: the loss is MSE(model(x_t), encode(x0)) with x_t = add_noise(encode(x0))."""
    torch.manual_seed(0)
    model = idmbench.create_model("wdm", preset="tiny")
    sched = D.make_train_scheduler()
    x0 = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    noise = torch.randn_like(x0)
    t = torch.tensor([250])
    loss = D.diffusion_loss(model, x0, sched, spec="wdm", noise=noise, timesteps=t)
    z0 = RECIPES["wavelet"].encode(x0)
    with torch.no_grad():
        ref = F.mse_loss(model(sched.add_noise(z0, noise, t), t), z0)
    assert torch.allclose(loss, ref)
    before = [p.detach().clone() for p in model.parameters()]
    opt = D.make_optimizer(model, lr=1e-3)
    losses = [D.training_step(model, opt, x0, sched, spec="wdm", noise=noise, timesteps=t) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.7 * losses[0], losses
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_ddim_sampling_step_at_16_uses_x0_prediction():
    torch.manual_seed(0)
    model = idmbench.create_model("wdm", preset="tiny").eval()
    seen = []
    model.unet.conv_in.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    out = D.sample(model, (1, 1, 16, 16, 16), num_inference_steps=5, max_steps=1, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 1, 16, 16, 16) and torch.isfinite(out).all()
    assert seen == [(1, 8, 8, 8, 8)]
    with pytest.raises(ValueError, match=r"the scheduler predicts 'epsilon' but wdm predicts 'sample'"):
        D.sample(model, (1, 1, 16, 16, 16), scheduler=D.make_sample_scheduler(2))
    # a full 3-step run: the DDIM loop ends on the model's x0 estimate, mapped back to image data
    out = D.sample(model, (1, 1, 16, 16, 16), num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()


def test_wdm_works_inside_monai_diffusion_inferer():
    torch.manual_seed(0)
    model = idmbench.create_model("wdm", preset="tiny")
    sched = DDIMScheduler(num_train_timesteps=1000, prediction_type="sample")
    inferer = DiffusionInferer(sched)
    x0 = torch.randn(2, 1, 16, 16, 16)
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (2,))
    pred = inferer(inputs=x0, diffusion_model=model, noise=noise, timesteps=t)
    assert pred.shape == x0.shape
    F.mse_loss(pred, x0).backward()
    sched.set_timesteps(num_inference_steps=2)
    with torch.no_grad():
        img = inferer.sample(input_noise=noise, diffusion_model=model.eval(), scheduler=sched, verbose=False)
    assert img.shape == x0.shape and torch.isfinite(img).all()


def test_training_step_runs_for_tiny_and_small():
    for preset, side in (("tiny", 16), ("small", 32)):
        model = idmbench.create_model("wdm", preset=preset)
        loss = D.training_step(model, D.make_optimizer(model), torch.randn(1, 1, side, side, side), D.make_train_scheduler(),
                               spec="wdm", generator=torch.Generator().manual_seed(0))
        assert math.isfinite(loss)


@pytest.mark.slow
@pytest.mark.parametrize("preset, side", [("paper", 64), ("paper128", 32)])
def test_paper_training_step_is_predicted(preset, side):
    """The reference networks' training step on fake tensors at the smallest side they accept."""
    from idmbench.measure.predict import Predictor

    p = Predictor("wdm", preset, flops=False).predict((side,) * 3, "train")
    assert p.ok, p.error
    assert tuple(p.net_shape) == (side // 2,) * 3
    # at least parameters + gradients + two AdamW moments
    assert p.peak_bytes >= 4 * 4 * {"paper": 73_654_216, "paper128": 52_083_400}[preset]
