"""Slab-wise recompute and in-place resampling: the memory-saving backward's pieces give autograd's results.

Float64 throughout, parameters moved off their initialisation (zero-initialised output convs would make
every sub-network the zero map). Slab counts that do and do not divide the side, down to one column.
"""

from __future__ import annotations

import pytest
import torch

import idmbench
from idmbench.invertible import (
    InvertibleUNetCore,
    MaskedAttentionNet,
    OrthogonalDownsample,
    RecomputeContext,
    TimeConditionedNet,
    slab_plan,
)
from idmbench.invertible.slabs import recompute_half
from idmbench.measure.memory import fake_mode, track_peak

TEMB = 12


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def randomise(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def test_slab_plan_covers_the_side_in_near_equal_aligned_runs():
    assert slab_plan(12, 3) == [(0, 4), (4, 8), (8, 12)]
    assert slab_plan(12, 5) == [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]  # 5 does not divide 12
    assert slab_plan(12, 2, align=4) == [(0, 8), (8, 12)]  # bounds on multiples of 4
    assert slab_plan(8, 10) == [(i, i + 1) for i in range(8)]  # never more slabs than columns
    assert slab_plan(8, 1) == [(0, 8)]


def _half_reference(net, x, temb, dout):
    """Plain autograd through ``net``: its output and the gradients of x, temb and every parameter."""
    xs = x.clone().requires_grad_(True)
    te = temb.clone().requires_grad_(True)
    out = net(xs, te)
    params = [p for p in net.parameters()]
    grads = torch.autograd.grad(out, [xs, te] + params, dout)
    return out.detach(), grads[0], grads[1], dict(zip([n for n, _ in net.named_parameters()], grads[2:]))


def _check_half(net, x, temb, slabs):
    """``target += net(x)`` undone and backpropagated by recompute_half in ``slabs`` slabs == autograd."""
    g = torch.Generator().manual_seed(3)
    dout = torch.randn(x.shape[0], net.c_out if hasattr(net, "c_out") else x.shape[1], *x.shape[2:],
                       generator=g, dtype=torch.float64)
    out, gx, gt, gp = _half_reference(net, x, temb, dout)
    target0 = torch.randn(out.shape, generator=g, dtype=torch.float64)
    dx0 = torch.randn(x.shape, generator=g, dtype=torch.float64)
    target, dx = target0 + out, dx0.clone()
    got_t, got_p = recompute_half(net, x.clone(), target, dout.clone(), dx, temb, RecomputeContext(slabs=slabs))
    assert rel(target, target0) <= 1e-12  # the inverse: the output is taken back out exactly
    assert rel(dx - dx0, gx) <= 1e-8
    assert rel(got_t, gt) <= 1e-8
    assert set(got_p) == set(gp)
    for name, ref in gp.items():
        assert rel(got_p[name], ref) <= 1e-8, name


@pytest.mark.parametrize("slabs", [1, 2, 3, 5, 12])
def test_coupling_subnet_recompute_in_slabs_equals_autograd(slabs):
    """GroupNorm's statistics and their gradient cross slabs; halos at the volume's edges and inside."""
    torch.manual_seed(0)
    net = randomise(TimeConditionedNet(4, 6, 8, TEMB)).double()
    x = torch.randn(2, 4, 5, 3, 12, dtype=torch.float64)
    _check_half(net, x, torch.randn(2, TEMB, dtype=torch.float64), slabs)


@pytest.mark.parametrize("slabs", [1, 2, 3])
def test_windowed_attention_recompute_in_slabs_in_place_equals_autograd(slabs):
    """The checkerboard half ``y = x + A(x)`` reads one colour and writes the other, so it is rebuilt in place
    in ``y`` while its input gradient lands in the same buffer as the output gradient (2 slabs: 3 windows do
    not split evenly)."""
    torch.manual_seed(0)
    net = randomise(MaskedAttentionNet(6, TEMB, head_dim=3, window=4, full_max_tokens=16, parity=1), scale=0.2).double()
    assert net.align((4, 4, 12)) == 4
    x = torch.randn(2, 6, 4, 4, 12, dtype=torch.float64)
    temb = torch.randn(2, TEMB, dtype=torch.float64)
    dy = torch.randn_like(x)
    out, gx, gt, gp = _half_reference(net, x, temb, dy)
    y, g = x + out, dy.clone()
    got_t, got_p = recompute_half(net, y, y, g, g, temb, RecomputeContext(slabs=slabs))
    assert rel(y, x) <= 1e-12
    assert rel(g, dy + gx) <= 1e-8  # d/dx of x + A(x)
    assert rel(got_t, gt) <= 1e-8
    for name, ref in gp.items():
        assert rel(got_p[name], ref) <= 1e-8, name


@pytest.mark.slow
@pytest.mark.parametrize("slabs", [3, 4])
def test_idm_with_forced_slabs_matches_plain_autograd_float64(slabs):
    """The whole model, every sub-network that can be sliced recomputed in ``slabs`` slabs (3 does not divide
    the 16-voxel side), against the plain-autograd twin: input, time MLP and every parameter."""
    nets = []
    for me in (True, False):
        torch.manual_seed(0)
        nets.append(randomise(idmbench.create_model("idm", preset="tiny", memory_efficient=me, recompute_slabs=slabs),
                              scale=0.1, seed=1).double())
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    t = torch.tensor([10, 700])
    xs = [x.clone().requires_grad_(True) for _ in nets]
    for net, xi in zip(nets, xs):
        net(xi, t).square().mean().backward()
    assert rel(xs[0].grad, xs[1].grad) <= 1e-8
    for (name, pa), pb in zip(nets[0].named_parameters(), nets[1].parameters()):
        assert float(pb.grad.norm()) > 0, name
        assert rel(pa.grad, pb.grad) <= 1e-8, name


def test_in_place_resampling_equals_the_orthogonal_convolution():
    """``down_`` writes ``down(x)`` into x's own elements (Haar per channel, then the rotation), ``up_`` undoes
    it; batch 2, a channel slice of a larger buffer, an odd channel count."""
    torch.manual_seed(0)
    r = randomise(OrthogonalDownsample(3), scale=0.1).double()
    buf = torch.randn(2, 7, 4, 6, 8, dtype=torch.float64)
    keep = buf[:, :4].clone()
    x = buf[:, 4:]
    ref = r.down(x.clone()).detach()
    low = r.down_(x)
    assert low.shape == (2, 24, 2, 3, 4) and low.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    assert rel(low, ref) <= 1e-13
    assert torch.equal(buf[:, :4], keep)  # the channels before the slice are untouched
    back = r.up_(low)
    assert rel(back, r.up(ref).detach()) <= 1e-13


@pytest.mark.parametrize("transposed", [False, True])
def test_resampling_kernel_gradient_from_low_resolution_tensors(transposed):
    """The gradient of the skew parameter from ``(a b^T) W`` equals autograd's through the convolution."""
    torch.manual_seed(0)
    r = randomise(OrthogonalDownsample(2), scale=0.1).double()
    if transposed:
        low = torch.randn(2, 16, 3, 2, 4, dtype=torch.float64)
        dcur = torch.randn(2, 2, 6, 4, 8, dtype=torch.float64)
        (ref,) = torch.autograd.grad(r.up(low), r.ortho.skew, dcur)
        (got,) = r.kernel_grad(low, r.down(dcur).detach())
    else:
        x = torch.randn(2, 2, 6, 4, 8, dtype=torch.float64)
        dlow = torch.randn(2, 16, 3, 2, 4, dtype=torch.float64)
        (ref,) = torch.autograd.grad(r.down(x), r.ortho.skew, dlow)
        (got,) = r.kernel_grad(dlow, r.down(x).detach())
    assert rel(got, ref) <= 1e-10


def test_sampling_forward_in_place_equals_plain_forward():
    """Without grad the memory-saving core runs in place (sampling); same result as the out-of-place forward,
    and the caller's input is left alone unless the core may consume it."""
    torch.manual_seed(0)
    core = randomise(InvertibleUNetCore(8, 2, 2, TEMB, attention_min_level=0, attn_full_max_tokens=64), scale=0.1).double()
    x = torch.randn(2, 8, 16, 16, 16, dtype=torch.float64)
    temb = torch.randn(2, TEMB, dtype=torch.float64)
    before = x.clone()
    with torch.no_grad():
        y = core(x, temb)
        ref = core.run(x, temb)
    assert torch.equal(x, before)
    assert rel(y, ref) <= 1e-12


@pytest.mark.parametrize("make,slabs", [
    (lambda: TimeConditionedNet(8, 8, 4, 64), (1, 2, 4, 8)),
    (lambda: TimeConditionedNet(16, 16, 16, 64), (1, 4)),
    (lambda: MaskedAttentionNet(48, 64, head_dim=32, window=4, full_max_tokens=64), (1, 4)),
], ids=["top-level coupling", "level-1 coupling", "windowed attention"])
def test_recompute_estimate_is_not_below_the_tracked_working_set(make, slabs):
    """The budget trusts ``recompute_bytes``: it must not under-estimate what the live-tensor tracker sees
    (fake tensors, 32^3), nor be far above it."""
    with fake_mode():
        net = make()
        c = net.c_in if hasattr(net, "c_in") else net.channels
        x = torch.randn(1, c, 32, 32, 32)
        tgt, dout, dx = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)
        temb = torch.randn(1, 64)
        fixed = 4 * x.numel() * 4 + sum(p.numel() * 4 for p in net.parameters())
        for n in slabs:
            _, peak = track_peak(lambda: recompute_half(net, x, tgt, dout, dx, temb, RecomputeContext(slabs=n)),
                                 net, x, tgt, dout, dx, temb, module_hooks=False, training=False)
            working = peak.total_bytes - fixed
            est = net.recompute_bytes(x, None if n == 1 else -(-32 // n))
            assert working <= est <= 1.35 * working, (n, working, est)


def test_budget_options_are_checked():
    with pytest.raises(ValueError, match="recompute_budget must be a positive fraction of the state or None"):
        idmbench.create_model("idm", preset="tiny", recompute_budget=0)
    with pytest.raises(ValueError, match="recompute_slabs must be >= 1 or None"):
        idmbench.create_model("idm", preset="tiny", recompute_slabs=0)
    with pytest.raises(ValueError, match="IDM got unknown option.*valid options: base_channels, levels.*recompute_budget"):
        idmbench.create_model("idm", preset="tiny", recompute_bugdet=0.5)


def test_convolution_helpers_equal_pytorchs():
    """``conv3d`` (oneDNN on real float32 CPU tensors, ``F.conv3d`` elsewhere) and ``conv3d_input_grad`` (the
    adjoint) give PyTorch's results; under fake tensors (predictions) the routing stands aside."""
    import torch.nn.functional as F

    from idmbench.invertible.conv import conv3d, conv3d_input_grad

    torch.manual_seed(0)
    x, w, b = torch.randn(1, 4, 8, 6, 10), torch.randn(8, 4, 3, 3, 3), torch.randn(8)
    for pad in ((1, 1, 1), (1, 1, 0)):
        assert torch.allclose(conv3d(x, w, b, pad), F.conv3d(x, w, b, padding=pad), atol=1e-5)
    g = torch.randn(2, 8, 5, 6, 7, dtype=torch.float64)
    w64 = w.double()
    assert rel(conv3d_input_grad(g, w64, (1, 1, 0)), F.conv_transpose3d(g, w64, padding=(1, 1, 0))) <= 1e-13
    with fake_mode():
        y = conv3d(torch.randn(1, 4, 64, 64, 64), torch.randn(8, 4, 3, 3, 3), None, (1, 1, 1))
        assert y.shape == (1, 8, 64, 64, 64)
