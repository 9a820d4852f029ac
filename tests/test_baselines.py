"""The baselines (``unet``, ``unet-ckpt``, ``patchddm``): real training, sampling, MONAI interop, checkpointing
equivalence and memory, PatchDDM's patch/coordinate recipe, and the promised errors. CPU, volumes <= 32^3."""

from __future__ import annotations

import pytest
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDPMScheduler

import idmbench
from idmbench import diffusion as D
from idmbench.measure.memory import training_activation_bytes

BASELINES = ["unet", "unet-ckpt", "patchddm"]
SIDE = 16  # every tiny baseline accepts 16^3 (divisor 4; PatchDDM trains on 8^3 patches)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The 2 CPU cores are shared: one intra-op thread is faster and steadier than two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def blob(side: int = SIDE, batch: int = 1, dtype=torch.float32) -> torch.Tensor:
    """A smooth test volume in [-1, 1]: a Gaussian blob, (batch, 1, side, side, side)."""
    g = D.global_coordinates((side, side, side), dtype=dtype)[0]
    v = torch.exp(-4.0 * (g**2).sum(0)) * 2 - 1
    return v.expand(batch, 1, -1, -1, -1).contiguous()


class ShapeRecorder:
    """Forward pre-hook recording the spatial shape (and ``coords`` shape) each call of a module sees."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list[tuple[tuple[int, ...], tuple[int, ...] | None]] = []
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        x = kwargs["x"] if "x" in kwargs else args[0]
        coords = kwargs.get("coords")
        self.calls.append((tuple(x.shape), None if coords is None else tuple(coords.shape)))

    def remove(self):
        self.handle.remove()


# ----------------------------------------------------------------------------------------- registry / sizes


def test_baselines_are_registered_with_their_recipes():
    names = idmbench.list_models()
    assert set(BASELINES) <= set(names)
    assert idmbench.registry.plugin_errors() == {}
    assert idmbench.get_spec("unet").family == idmbench.get_spec("unet-ckpt").family == "unet"
    assert idmbench.get_spec("unet").recipe == "full" and idmbench.get_spec("unet-ckpt").recipe == "full"
    assert idmbench.get_spec("patchddm").recipe == "patch"
    for n in BASELINES:
        assert {"tiny", "small", "paper"} <= set(idmbench.get_spec(n).presets)


@pytest.mark.parametrize(
    "name, preset, divisor",
    [("unet", "tiny", 4), ("unet", "paper", 4), ("unet-ckpt", "small", 4), ("patchddm", "small", 8), ("patchddm", "paper", 64)],
)
def test_divisor_is_two_to_the_levels_minus_one(name, preset, divisor):
    spec = idmbench.get_spec(name)
    cfg = spec.config(preset)
    assert spec.divisor(cfg) == divisor == 2 ** (len(cfg["channels"]) - 1)
    assert spec.divisor({}) == spec.divisor(spec.config("small"))  # the build defaults are the small preset
    if preset != "paper":
        assert idmbench.create_model(name, preset=preset).divisor == divisor


def test_paper_presets_follow_the_references():
    u = idmbench.create_model("unet", preset="paper")
    assert tuple(u.block_out_channels) == (64, 64, 128)
    assert tuple(u.attention_levels) == (False, False, True)
    assert tuple(u.num_res_blocks) == (2, 2, 2)
    assert tuple(u.num_head_channels)[-1] == 128  # one head over the attention level, as in the tutorial
    p = idmbench.create_model("patchddm", preset="paper")
    assert tuple(p.block_out_channels) == (29, 87, 116, 116, 116, 116, 116)
    assert not any(p.attention_levels)
    assert isinstance(p.middle_block.attention, torch.nn.Identity)  # no attention in the bottleneck either
    assert tuple(p.num_res_blocks) == (2,) * 7
    assert p.conv_in.conv.in_channels == 1 + 3  # image + global coordinates


# ------------------------------------------------------------------------------------- training / sampling


@pytest.mark.parametrize("name", BASELINES)
def test_overfits_one_fixed_batch(name):
    """30 real AdamW steps on one fixed batch (same patch, noise and t every step) clearly lower the loss."""
    torch.manual_seed(0)
    model = idmbench.create_model(name, preset="tiny")
    opt = D.make_optimizer(model, lr=1e-3)
    sched = D.make_train_scheduler()
    x0 = blob()
    losses = [
        D.training_step(model, opt, x0, sched, spec=name, generator=torch.Generator().manual_seed(0)) for _ in range(30)
    ]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("name", BASELINES)
def test_ddim_sampling_returns_the_full_volume(name):
    torch.manual_seed(0)
    model = idmbench.create_model(name, preset="tiny").eval()
    rec = ShapeRecorder(model)
    out = D.sample(model, (2, 1, SIDE, SIDE, SIDE), num_inference_steps=3, generator=torch.Generator().manual_seed(1))
    rec.remove()
    assert out.shape == (2, 1, SIDE, SIDE, SIDE)
    assert torch.isfinite(out).all()
    # three network evaluations, each on the whole volume (PatchDDM too: no coords, the full grid)
    assert [c[0] for c in rec.calls] == [(2, 1, SIDE, SIDE, SIDE)] * 3


@pytest.mark.parametrize("name", BASELINES)
def test_models_work_inside_monai_diffusion_inferer(name):
    torch.manual_seed(0)
    model = idmbench.create_model(name, preset="tiny")
    sched = DDPMScheduler(num_train_timesteps=1000)
    inferer = DiffusionInferer(sched)
    x0 = blob(batch=2)
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (2,))
    pred = inferer(inputs=x0, diffusion_model=model, noise=noise, timesteps=t)
    assert pred.shape == x0.shape
    torch.nn.functional.mse_loss(pred, noise).backward()
    sched.set_timesteps(num_inference_steps=2)
    with torch.no_grad():
        img = inferer.sample(input_noise=noise, diffusion_model=model.eval(), scheduler=sched, verbose=False)
    assert img.shape == x0.shape and torch.isfinite(img).all()


def test_timesteps_of_shape_one_broadcast_to_the_batch():
    torch.manual_seed(0)
    model = idmbench.create_model("unet", preset="tiny")
    torch.nn.init.normal_(model.out[2].conv.weight, std=0.1)  # MONAI zero-initialises the head
    x = torch.randn(3, 1, SIDE, SIDE, SIDE)
    with torch.no_grad():
        a = model(x=x, timesteps=torch.tensor([7]))
        b = model(x=x, timesteps=torch.tensor([7, 7, 7]))
        c = model(x, torch.tensor(7))  # positional and 0-d also accepted
    assert torch.equal(a, b) and torch.equal(a, c)


# ------------------------------------------------------------------------------------------------ unet-ckpt


def _unet_pair(dtype=torch.float64):
    torch.manual_seed(0)
    unet = idmbench.create_model("unet", preset="tiny")
    with torch.no_grad():  # MONAI zero-initialises the head, which would zero every other gradient
        for p in unet.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.05)
    ckpt = idmbench.create_model("unet-ckpt", preset="tiny")
    missing, unexpected = ckpt.load_state_dict(unet.state_dict(), strict=True)
    assert not missing and not unexpected
    return unet.to(dtype), ckpt.to(dtype)


def test_unet_state_dict_loads_into_unet_ckpt():
    unet = idmbench.create_model("unet", preset="small")
    ckpt = idmbench.create_model("unet-ckpt", preset="small")
    assert list(unet.state_dict()) == list(ckpt.state_dict())
    ckpt.load_state_dict(unet.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), ckpt.state_dict().values()))


def test_unet_ckpt_gives_the_same_loss_and_gradients_in_float64():
    unet, ckpt = _unet_pair(torch.float64)
    sched = D.make_train_scheduler()
    x0 = blob(batch=2, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([120, 830])
    losses, grads = [], []
    for m in (unet, ckpt):
        m.zero_grad(set_to_none=True)
        loss = D.diffusion_loss(m, x0, sched, spec=m.idmbench_spec, noise=noise, timesteps=t)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad for p in m.parameters()])
    assert torch.allclose(losses[0], losses[1], rtol=1e-8, atol=0)
    flat = [torch.cat([g.flatten() for g in gs]) for gs in grads]
    assert (flat[1] - flat[0]).norm() <= 1e-8 * flat[0].norm()
    for ga, gb in zip(*grads):  # and per tensor; every parameter gets a gradient
        assert gb is not None and ga.abs().sum() > 0
        assert (gb - ga).norm() <= 1e-8 * ga.norm()


def test_unet_ckpt_recomputes_each_block_in_backward():
    """Checkpointing is really on: every down/middle/up block and the head are entered twice per training step
    (the recompute may stop early once it has what backward needs, so count entries, not completions)."""
    counts: dict[str, int] = {}
    unet, ckpt = _unet_pair(torch.float32)
    x = torch.randn(1, 1, SIDE, SIDE, SIDE)
    for m in (unet, ckpt):
        blocks = {"down0": m.down_blocks[0], "mid": m.middle_block, "up0": m.up_blocks[0], "head": m.out}
        hooks = [b.register_forward_pre_hook(lambda *_, k=k, n=m.idmbench_spec: counts.__setitem__((n, k), counts.get((n, k), 0) + 1)) for k, b in blocks.items()]
        m(x, torch.tensor([5])).square().mean().backward()
        for h in hooks:
            h.remove()
    assert all(counts[("unet", k)] == 1 for k in ("down0", "mid", "up0", "head"))
    assert all(counts[("unet-ckpt", k)] == 2 for k in ("down0", "mid", "up0", "head"))
    with torch.no_grad():  # nothing to recompute when sampling
        counts.clear()
        hook = ckpt.up_blocks[0].register_forward_pre_hook(lambda *_: counts.__setitem__("nograd", counts.get("nograd", 0) + 1))
        ckpt(x, torch.tensor([5]))
        hook.remove()
    assert counts["nograd"] == 1


def test_unet_ckpt_needs_less_activation_memory():
    """Live tensor bytes of a training step minus parameters and gradients (MemTracker): clearly lower."""
    unet, ckpt = _unet_pair(torch.float32)
    x = torch.randn(1, 1, SIDE, SIDE, SIDE)
    t = torch.tensor([10])
    plain = training_activation_bytes(unet, x, t).activation_bytes
    chk = training_activation_bytes(ckpt, x, t).activation_bytes
    assert 0 < chk < 0.8 * plain, (chk, plain)


# ------------------------------------------------------------------------------------------------- PatchDDM


@pytest.mark.parametrize("seed", range(4))
def test_patch_carries_the_global_coordinates_of_its_position(seed):
    size = (16, 24, 32)  # not a cube: an axis mix-up would show
    x0 = torch.arange(2 * 16 * 24 * 32, dtype=torch.float32).reshape(2, 1, *size)  # every voxel distinct
    ex = D.training_example("patchddm", x0, idmbench.get_spec("patchddm").config("tiny"), torch.Generator().manual_seed(seed))
    o = ex.origin
    p = (8, 12, 16)  # half of each side
    sl = (slice(None), slice(None)) + tuple(slice(a, a + n) for a, n in zip(o, p))
    assert all(0 <= a <= s - n for a, s, n in zip(o, size, p))
    assert torch.equal(ex.x0, x0[sl])
    coords = ex.model_kwargs["coords"]
    assert coords.shape == (2, 3, *p)
    assert torch.equal(coords, D.global_coordinates(size, 2)[sl])
    # independently of global_coordinates: the patch's first voxel sits at -1 + 2 * origin / (side - 1)
    corner = coords[0, :, 0, 0, 0]
    expect = torch.tensor([-1 + 2 * a / (s - 1) for a, s in zip(o, size)])
    assert torch.allclose(corner, expect, atol=1e-6)
    assert torch.allclose(coords[0, :, -1, -1, -1], torch.tensor([-1 + 2 * (a + n - 1) / (s - 1) for a, n, s in zip(o, p, size)]), atol=1e-6)


def test_patch_origins_vary_and_cover_the_volume():
    x0 = torch.zeros(1, 1, 16, 16, 16)
    cfg = idmbench.get_spec("patchddm").config("tiny")
    g = torch.Generator().manual_seed(0)
    origins = {D.training_example("patchddm", x0, cfg, g).origin for _ in range(60)}
    assert len(origins) > 20
    assert {o[0] for o in origins} == set(range(9))  # every start 0..S-p along an axis is drawn


def test_patchddm_training_step_runs_the_network_at_half_the_side():
    S = 32
    model = idmbench.create_model("patchddm", preset="tiny")
    rec = ShapeRecorder(model)
    inner = ShapeRecorder(model.conv_in)  # what the UNet itself sees: image + 3 coordinate channels
    D.training_step(model, D.make_optimizer(model), blob(S), D.make_train_scheduler(), spec="patchddm", generator=torch.Generator().manual_seed(0))
    rec.remove()
    inner.remove()
    assert rec.calls == [((1, 1, S // 2, S // 2, S // 2), (1, 3, S // 2, S // 2, S // 2))]
    assert inner.calls[0][0] == (1, 4, S // 2, S // 2, S // 2)


def test_patch_fraction_is_configurable():
    model = idmbench.create_model("patchddm", preset="tiny", patch_fraction=0.25)
    assert model.patch_fraction == 0.25
    rec = ShapeRecorder(model)
    D.diffusion_loss(model, blob(32), D.make_train_scheduler(), spec="patchddm", generator=torch.Generator().manual_seed(0))
    rec.remove()
    assert rec.calls[0][0][2:] == (8, 8, 8)  # the config create_model stamped on the model is used


def test_patchddm_without_coords_uses_the_grid_of_the_whole_input():
    torch.manual_seed(0)
    model = idmbench.create_model("patchddm", preset="tiny")
    torch.nn.init.normal_(model.out[2].conv.weight, std=0.1)
    x = torch.randn(2, 1, SIDE, SIDE, SIDE)
    t = torch.tensor([3, 500])
    with torch.no_grad():
        a = model(x, t)
        b = model(x, t, coords=D.global_coordinates((SIDE,) * 3, 2))
        c = model(x, t, coords=-D.global_coordinates((SIDE,) * 3, 2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)  # the coordinates really condition the network


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("name", BASELINES)
def test_side_not_divisible_raises_a_clear_error_in_forward(name):
    model = idmbench.create_model(name, preset="tiny")
    with pytest.raises(ValueError) as e:
        model(torch.randn(1, 1, 16, 18, 16), torch.tensor([1]))
    msg = str(e.value)
    assert name in msg and "(16, 18, 16)" in msg and "divisible by 4" in msg and "4, 8, 16" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("name", BASELINES)
def test_wrong_ndim_or_channels_raise_a_clear_error(name):
    model = idmbench.create_model(name, preset="tiny")
    with pytest.raises(ValueError, match=rf"{name}: x must be a 5-D tensor \(B, C, D, H, W\); got shape \(1, 16, 16, 16\)"):
        model(torch.randn(1, 16, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match=rf"{name}: x must have 1 channel\(s\).*got shape \(1, 2, 16, 16, 16\)"):
        model(torch.randn(1, 2, 16, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match=rf"{name}: timesteps must have shape \(2,\) or \(1,\); got \(3,\)"):
        model(torch.randn(2, 1, 16, 16, 16), torch.tensor([1, 2, 3]))


def test_bad_coords_raise_a_clear_error():
    model = idmbench.create_model("patchddm", preset="tiny")
    with pytest.raises(ValueError, match=r"patchddm: coords must have shape \(1, 3, 8, 8, 8\) like x; got \(1, 3, 16, 16, 16\)"):
        model(torch.randn(1, 1, 8, 8, 8), torch.tensor([1]), coords=D.global_coordinates((16, 16, 16)))


@pytest.mark.parametrize("name, size, multiple", [("unet", (30, 32, 32), 4), ("unet-ckpt", (32, 32, 6), 4), ("patchddm", (32, 20, 32), 8)])
def test_check_size_names_model_size_and_valid_multiples(name, size, multiple):
    spec = idmbench.get_spec(name)
    cfg = spec.config("tiny")
    with pytest.raises(ValueError) as e:
        spec.check_size(size, cfg)
    msg = str(e.value)
    assert msg.startswith(name) and str(size) in msg and f"{multiple}, {2 * multiple}" in msg
    spec.check_size((32, 32, 32), cfg)  # a good size passes
    assert spec.valid_sides(cfg) == multiple


def test_training_step_rejects_a_bad_volume_before_monai():
    """A side of 20 passes the UNet's divisor 4 but its 10-voxel patch does not: caught up front, by name."""
    model = idmbench.create_model("patchddm", preset="tiny")
    with pytest.raises(ValueError, match=r"patchddm needs every side divisible by 4 .*got \(20, 16, 16\).*multiples of 8"):
        D.training_step(model, D.make_optimizer(model), torch.zeros(1, 1, 20, 16, 16), D.make_train_scheduler(), spec="patchddm")
    unet = idmbench.create_model("unet", preset="tiny")
    with pytest.raises(ValueError, match=r"unet needs every side divisible by 4; got \(16, 16, 17\)"):
        D.training_step(unet, D.make_optimizer(unet), torch.zeros(1, 1, 16, 16, 17), D.make_train_scheduler(), spec="unet")


@pytest.mark.parametrize("frac", [0.0, -0.5, 1.5, "half"])
def test_patch_fraction_outside_zero_one_is_rejected(frac):
    with pytest.raises(ValueError, match=r"patchddm: patch_fraction must be .*\(0, 1\]"):
        idmbench.create_model("patchddm", preset="tiny", patch_fraction=frac)
    if not isinstance(frac, str):
        spec = idmbench.get_spec("patchddm")
        with pytest.raises(ValueError, match=r"patchddm: patch_fraction must be in \(0, 1\]"):
            spec.check_size((16, 16, 16), spec.config("tiny", patch_fraction=frac))
        with pytest.raises(ValueError, match=r"patch_fraction must be in \(0, 1\]"):
            D.training_example("patchddm", torch.zeros(1, 1, 16, 16, 16), spec.config("tiny", patch_fraction=frac))


def test_patch_fraction_one_trains_on_the_whole_volume():
    model = idmbench.create_model("patchddm", preset="tiny", patch_fraction=1.0)
    rec = ShapeRecorder(model)
    D.diffusion_loss(model, blob(), D.make_train_scheduler(), spec="patchddm")
    rec.remove()
    assert rec.calls[0] == ((1, 1, SIDE, SIDE, SIDE), (1, 3, SIDE, SIDE, SIDE))


def test_bad_build_options_raise_clear_errors():
    with pytest.raises(ValueError, match=r"unet: unknown option\(s\) chanels; valid options: .*channels"):
        idmbench.create_model("unet", preset="tiny", chanels=(8, 16))
    with pytest.raises(ValueError, match=r"unet: every channel count must be a multiple of norm_num_groups=4"):
        idmbench.create_model("unet", preset="tiny", channels=(4, 6, 8))
    with pytest.raises(ValueError, match=r"unet: attention_levels has 2 entries but channels has 3 levels"):
        idmbench.create_model("unet", preset="tiny", attention_levels=(False, True))
    # overriding the number of levels keeps the preset's "attention at the last level"
    m = idmbench.create_model("unet", preset="tiny", channels=(4, 8))
    assert tuple(m.attention_levels) == (False, True) and m.divisor == 2


# ------------------------------------------------------------------------------------ attention (issue 9)


def _attention_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """MONAI's self-attention modules (``SABlock``) inside ``model``."""
    return [m for m in model.modules() if type(m).__name__ == "SABlock"]


@pytest.mark.parametrize("name", ["unet", "unet-ckpt"])
def test_monai_baselines_run_attention_through_sdpa_by_default(name):
    for preset in ("tiny", "small", "paper"):
        assert idmbench.get_spec(name).config(preset)["use_flash_attention"] is True
    blocks = _attention_blocks(idmbench.create_model(name, preset="tiny"))
    assert blocks and all(b.use_flash_attention for b in blocks)
    naive = _attention_blocks(idmbench.create_model(name, preset="tiny", use_flash_attention=False))
    assert naive and not any(b.use_flash_attention for b in naive)
    info = idmbench.get_spec(name).describe(idmbench.get_spec(name).config("small"))
    assert info["attention"] == "sdpa" and "use_flash_attention=True" in info["source"]
    off = idmbench.get_spec(name).describe(idmbench.get_spec(name).config("small", use_flash_attention=False))
    assert off["attention"] == "naive (materialised N×N)" and off["overrides"] == {"use_flash_attention": False}


def test_sdpa_and_naive_attention_give_the_same_output_and_gradients():
    """Same weights, float32: the SDPA path and MONAI's materialised-matrix path agree to <= 1e-5 (output) and
    give the same gradients."""
    torch.manual_seed(0)
    sdpa = idmbench.create_model("unet", preset="tiny")
    with torch.no_grad():  # MONAI zero-initialises the head and the attention output: un-zero them
        for p in sdpa.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.05)
    naive = idmbench.create_model("unet", preset="tiny", use_flash_attention=False)
    naive.load_state_dict(sdpa.state_dict(), strict=True)
    x = torch.randn(2, 1, SIDE, SIDE, SIDE)
    t = torch.tensor([30, 800])
    outs, grads = [], []
    for m in (sdpa, naive):
        y = m(x, t)
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append([p.grad for p in m.parameters()])
    assert (outs[0] - outs[1]).norm() <= 1e-5 * outs[1].norm()
    flat = [torch.cat([g.flatten() for g in gs]) for gs in grads]
    assert (flat[0] - flat[1]).norm() <= 1e-5 * flat[1].norm()
    attn = [n for n, _ in sdpa.named_parameters() if ".attn." in n]
    assert attn  # the attention weights themselves get the same gradients
    by_name = [dict(zip([n for n, _ in m.named_parameters()], gs)) for m, gs in zip((sdpa, naive), grads)]
    scale = flat[1].norm()  # (the key bias's true gradient is 0: softmax ignores a shift shared by all keys)
    for n in attn:
        assert (by_name[0][n] - by_name[1][n]).norm() <= 1e-4 * by_name[1][n].norm() + 1e-7 * scale, n


@pytest.mark.slow
def test_sdpa_lowers_the_predicted_training_peak_of_unet_small_at_64():
    from idmbench.measure.predict import Predictor

    peaks = {}
    for flash in (True, False):
        p = Predictor("unet", "small", flops=False, overrides={"use_flash_attention": flash}).predict((64, 64, 64), "train")
        assert p.ok, p.error
        peaks[flash] = p.peak_bytes
    # the naive path stores the (heads, N, N) attention matrix of the 16^3-token level: 4096^2 x 4 B = 64 MiB
    # per copy; SDPA does not
    assert peaks[True] < peaks[False] - 64 * 2**20, peaks


# ------------------------------------------------------------------------- PatchDDM-3D as published, sizes


def test_patchddm_is_the_guided_diffusion_unet_with_additive_skips():
    from baselines.gdunet import GDUNet3D

    p = idmbench.create_model("patchddm", preset="tiny")
    assert isinstance(p, GDUNet3D) and p.additive_skips
    for preset in ("tiny", "small", "paper"):
        cfg = idmbench.get_spec("patchddm").config(preset)
        assert cfg["additive_skips"] is True and cfg["attention_levels"] == "none" and cfg["bottleneck_attention"] is False
    assert idmbench.get_spec("patchddm").describe(idmbench.get_spec("patchddm").config("paper"))["attention"] == "none"


def test_small_presets_are_parameter_matched():
    """Every model's ``small`` preset within ±5 % of both ``unet`` small and ``idm`` small."""
    counts = {n: idmbench.count_parameters(idmbench.create_model(n, preset="small")) for n in idmbench.list_models()
              if "small" in idmbench.get_spec(n).presets}
    for ref in ("unet", "idm"):
        for n, c in counts.items():
            assert abs(c - counts[ref]) <= 0.05 * counts[ref], (n, c, ref, counts[ref])


@pytest.mark.parametrize("preset, side", [("tiny", 16), ("small", 32)])
def test_patchddm_training_step_runs_for_each_preset(preset, side):
    model = idmbench.create_model("patchddm", preset=preset)
    loss = D.training_step(model, D.make_optimizer(model), blob(side), D.make_train_scheduler(), spec="patchddm",
                           generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.tensor(loss))


@pytest.mark.slow
def test_patchddm_paper_training_step_is_predicted():
    """The reference network at its smallest side (128^3: 64^3 patches) on fake tensors."""
    from idmbench.measure.predict import Predictor

    p = Predictor("patchddm", "paper", flops=False).predict((128, 128, 128), "train")
    assert p.ok, p.error
    assert tuple(p.net_shape) == (64, 64, 64)
    assert p.peak_bytes >= 4 * 4 * 24_257_167  # parameters, gradients, two AdamW moments


def test_network_shape_and_voxels_follow_the_recipe():
    pd, un = idmbench.get_spec("patchddm"), idmbench.get_spec("unet")
    cfg = pd.config("paper")
    assert pd.network_shape((256, 256, 256), cfg, "train") == (128, 128, 128)
    assert pd.network_shape((256, 256, 256), cfg, "sample") == (256, 256, 256)
    assert pd.network_voxels((256, 256, 256), cfg, "train") == 128**3
    assert pd.network_voxels((256, 256, 256), cfg, "sample") == 256**3
    assert pd.network_channels(cfg) == 4 and un.network_channels(un.config("small")) == 1
    assert un.network_shape((32, 64, 32), un.config("small"), "train") == (32, 64, 32)
    with pytest.raises(ValueError, match=r"unknown phase 'eval'; valid phases: train, sample"):
        un.network_shape((32, 32, 32), un.config("small"), "eval")
