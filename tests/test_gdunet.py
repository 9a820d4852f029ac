"""The guided-diffusion-style 3D UNet (``baselines.gdunet``): parameter counts of the reference networks, the
additive-skip decoder widths, SDPA vs the materialised attention matrix, zero-initialised blocks, errors.
CPU, volumes <= 16^3; the reference networks are built on the ``meta`` device (no memory, milliseconds)."""

from __future__ import annotations

import pytest
import torch

import idmbench
from baselines.gdunet import GDUNet3D, ResBlock


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The 2 CPU cores are shared: one intra-op thread is faster and steadier than two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_unet(in_channels: int, out_channels: int, base: int, mult: tuple[int, ...], groups: int, **kw) -> GDUNet3D:
    with torch.device("meta"):
        return GDUNet3D(in_channels, out_channels, channels=tuple(base * m for m in mult), norm_num_groups=groups, **kw)


def decoder_widths(model: GDUNet3D) -> list[list[tuple[int, int]]]:
    return [[(r.in_channels, r.out_channels) for r in level.resnets] for level in model.up_blocks]


# ------------------------------------------------------------------------------------ reference counts


@pytest.mark.parametrize(
    "what, in_ch, out_ch, base, mult, groups, expected",
    [
        # PatchDDM-3D run.sh: 4 MRI + noisy mask + 3 coordinates in, 1 out
        ("patchddm reference (8 in)", 8, 1, 29, (1, 3, 4, 4, 4, 4, 4), 29, 24_260_299),
        # the benchmark's 1 image + 3 coordinates
        ("patchddm benchmark (4 in)", 4, 1, 29, (1, 3, 4, 4, 4, 4, 4), 29, 24_257_167),
        # WDM-3D run.sh: 8 sub-bands in and out
        ("wdm 128^3", 8, 8, 64, (1, 2, 2, 4, 4), 32, 52_083_400),
        ("wdm 256^3", 8, 8, 64, (1, 2, 2, 4, 4, 4), 32, 73_654_216),
    ],
)
def test_parameter_counts_match_the_reference_networks(what, in_ch, out_ch, base, mult, groups, expected):
    n = n_params(meta_unet(in_ch, out_ch, base, mult, groups, num_res_blocks=2, additive_skips=True))
    assert abs(n - expected) <= 0.01 * expected, (what, n, expected)
    assert n == expected  # in fact exactly


def test_concatenated_skips_give_monais_count_for_the_same_settings():
    """PatchDDM-3D's settings with concatenated skips: the count of MONAI's DiffusionModelUNet (the old patchddm)."""
    n = n_params(meta_unet(4, 1, 29, (1, 3, 4, 4, 4, 4, 4), 29, num_res_blocks=2, additive_skips=False))
    assert n == 32_328_795


def test_registered_paper_presets_have_the_reference_counts():
    with torch.device("meta"):
        counts = {
            ("patchddm", "paper"): n_params(idmbench.create_model("patchddm", preset="paper")),
            ("wdm", "paper"): n_params(idmbench.create_model("wdm", preset="paper")),
            ("wdm", "paper128"): n_params(idmbench.create_model("wdm", preset="paper128")),
        }
    assert counts == {("patchddm", "paper"): 24_257_167, ("wdm", "paper"): 73_654_216, ("wdm", "paper128"): 52_083_400}


# ------------------------------------------------------------------------------------- decoder layout


def test_additive_skip_decoder_widths_follow_the_reference():
    """Guided diffusion with additive skips: each decoder ResBlock goes to the width of the *next* skip it will
    meet, so widths drop one block before the level changes (written out by hand for base 4, (1, 2, 3))."""
    m = GDUNet3D(1, 1, channels=(4, 8, 12), num_res_blocks=2, norm_num_groups=4, additive_skips=True)
    assert decoder_widths(m) == [
        [(12, 12), (12, 8), (8, 8)],  # level 2 (deepest): skips 12, 12, then the level-1 downsample (8)
        [(8, 8), (8, 4), (4, 4)],
        [(4, 4), (4, 4), (4, 4)],  # level 0: the last skip is conv_in's output (base width)
    ]
    assert [[(r.in_channels, r.out_channels) for r in lv.resnets] for lv in m.down_blocks] == [
        [(4, 4), (4, 4)], [(4, 8), (8, 8)], [(8, 12), (12, 12)]
    ]
    assert [lv.resampler is not None for lv in m.down_blocks] == [True, True, False]
    assert [lv.resampler is not None for lv in m.up_blocks] == [True, True, False]
    assert m.out[2].conv.in_channels == 4


def test_concatenated_skip_decoder_widths():
    m = GDUNet3D(1, 1, channels=(4, 8, 12), num_res_blocks=2, norm_num_groups=4, additive_skips=False)
    assert decoder_widths(m) == [
        [(24, 12), (24, 12), (20, 12)],
        [(20, 8), (16, 8), (12, 8)],
        [(12, 4), (8, 4), (8, 4)],
    ]


def test_additive_skips_average_the_skip_into_the_decoder():
    """With every ResBlock and resampler zeroed except the identities, the forward is exactly the mean of the
    decoder path and the skip at each merge: check one merge by hooking the first decoder ResBlock."""
    torch.manual_seed(0)
    m = GDUNet3D(1, 1, channels=(4, 8), num_res_blocks=1, norm_num_groups=4)
    seen = {}
    m.middle_block.register_forward_hook(lambda mod, a, out: seen.__setitem__("mid", out))
    m.down_blocks[1].resnets[0].register_forward_hook(lambda mod, a, out: seen.__setitem__("skip", out))
    m.up_blocks[0].resnets[0].register_forward_pre_hook(lambda mod, a: seen.__setitem__("merged", a[0]))
    m(torch.randn(1, 1, 8, 8, 8), torch.tensor([3]))
    assert torch.allclose(seen["merged"], (seen["mid"] + seen["skip"]) / 2)


def test_blocks_start_as_the_identity_and_the_output_at_zero():
    torch.manual_seed(0)
    block = ResBlock(8, 8, 16, 4)
    x, emb = torch.randn(2, 8, 4, 4, 4), torch.randn(2, 16)
    assert torch.equal(block(x, emb), x)  # zero-initialised second conv
    m = GDUNet3D(2, 3, channels=(4, 8), num_res_blocks=1, norm_num_groups=4)
    assert torch.equal(m(torch.randn(1, 2, 8, 8, 8), torch.tensor([1])), torch.zeros(1, 3, 8, 8, 8))


def test_gradients_reach_every_parameter_and_the_time_mlp():
    torch.manual_seed(0)
    m = GDUNet3D(1, 1, channels=(4, 8), num_res_blocks=1, norm_num_groups=4, attention_levels="last", bottleneck_attention=True)
    with torch.no_grad():  # un-zero the zero-initialised layers so that every gradient is non-zero
        for p in m.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.1)
    m(torch.randn(2, 1, 8, 8, 8), torch.tensor([10, 900])).square().mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, missing
    assert m.time_embed[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- attention


def _attention_pair():
    torch.manual_seed(0)
    kw = dict(channels=(8, 16), num_res_blocks=1, norm_num_groups=4, attention_levels="all", bottleneck_attention=True, num_heads=2)
    sdpa = GDUNet3D(1, 1, use_flash_attention=True, **kw)
    with torch.no_grad():
        for p in sdpa.parameters():
            if not p.abs().sum():
                p.normal_(0.0, 0.1)
    naive = GDUNet3D(1, 1, use_flash_attention=False, **kw)
    naive.load_state_dict(sdpa.state_dict(), strict=True)
    return sdpa, naive


def test_sdpa_and_materialised_attention_give_the_same_output_and_gradients():
    sdpa, naive = _attention_pair()
    x = torch.randn(2, 1, 8, 8, 8)
    t = torch.tensor([5, 700])
    outs, grads = [], []
    for m in (sdpa, naive):
        y = m(x, t)
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert (outs[0] - outs[1]).norm() <= 1e-5 * outs[1].norm()
    assert (grads[0] - grads[1]).norm() <= 1e-5 * grads[1].norm()


def test_sdpa_is_the_default_and_the_attention_blocks_sit_where_asked():
    m = GDUNet3D(1, 1, channels=(4, 8), num_res_blocks=1, norm_num_groups=4, attention_levels=(False, True))
    kinds = [[type(a).__name__ for a in lv.attentions] for lv in m.down_blocks]
    assert kinds == [["Identity"], ["AttentionBlock"]]
    assert all(a.use_flash_attention for lv in m.up_blocks for a in lv.attentions if hasattr(a, "use_flash_attention"))
    assert isinstance(m.middle_block.attention, torch.nn.Identity)  # bottleneck attention is off by default


# ------------------------------------------------------------------------------------------------ errors


def test_bad_settings_and_inputs_raise_one_line_errors():
    with pytest.raises(ValueError, match=r"gdunet: every channel count must be a multiple of norm_num_groups=4; got channels \(4, 6\)"):
        GDUNet3D(1, 1, channels=(4, 6), norm_num_groups=4)
    with pytest.raises(ValueError, match=r"attention_levels has 1 entries but channels has 2 levels"):
        GDUNet3D(1, 1, channels=(4, 8), norm_num_groups=4, attention_levels=(True,))
    with pytest.raises(ValueError, match=r"num_res_blocks must be a positive int or one per level"):
        GDUNet3D(1, 1, channels=(4, 8), norm_num_groups=4, num_res_blocks=0)
    m = GDUNet3D(1, 1, channels=(4, 8, 8), norm_num_groups=4, num_res_blocks=1)
    with pytest.raises(ValueError) as e:
        m(torch.randn(1, 1, 8, 10, 8), torch.tensor([1]))
    assert str(e.value) == "gdunet needs every side divisible by 4; got (8, 10, 8); valid sides: 4, 8, 16, ..."
    with pytest.raises(ValueError, match=r"gdunet: x must have 1 channel\(s\)"):
        m(torch.randn(1, 2, 8, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"patchddm: unknown option\(s\) chanels; valid options: .*channels"):
        idmbench.create_model("patchddm", preset="tiny", chanels=(4, 8))
