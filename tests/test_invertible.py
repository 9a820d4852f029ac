"""The bijective layers: inverse(forward(x)) == x, exact backward passes, orthogonal resampling."""

from __future__ import annotations

import pytest
import torch

from idmbench.invertible import (
    AdditiveCoupling,
    CheckerboardAttentionCoupling,
    InvertibleUNetCore,
    SplitDownsample,
    UpsampleMerge,
    checkerboard,
    haar_matrix,
)

TEMB = 12


def randomise(module: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its init (zero-initialised convs would make couplings identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def layer_cases():
    # (name, layer factory, input state shapes)
    return [
        ("coupling", lambda: AdditiveCoupling(8, TEMB), [(2, 8, 8, 8, 8)]),
        ("attention-full", lambda: CheckerboardAttentionCoupling(6, TEMB, index=-1, full_max_tokens=512), [(2, 6, 4, 8, 8)]),
        ("attention-windowed", lambda: CheckerboardAttentionCoupling(6, TEMB, index=-2, window=4, full_max_tokens=64), [(2, 6, 8, 8, 8), (2, 16, 4, 4, 4)]),
        ("split-down", lambda: SplitDownsample(8), [(2, 8, 8, 8, 8)]),
        ("up-merge", lambda: UpsampleMerge(8), [(2, 6, 8, 8, 8), (2, 16, 4, 4, 4)]),
    ]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name,make,shapes", layer_cases(), ids=[c[0] for c in layer_cases()])
def test_layer_inverse_recovers_input(name, make, shapes, dtype, tol):
    torch.manual_seed(0)
    layer = randomise(make()).to(dtype)
    state = [torch.randn(s, dtype=dtype) for s in shapes]
    temb = torch.randn(2, TEMB, dtype=dtype)
    with torch.no_grad():
        out = layer(state, temb)
        assert sum(t.numel() for t in out) == sum(t.numel() for t in state)  # a bijection conserves elements
        assert rel(torch.cat([t.flatten() for t in out]), torch.cat([t.flatten() for t in state])) > 1e-3  # not the identity
        back = layer.inverse(out, temb)
    assert len(back) == len(state)
    for b, s in zip(back, state):
        assert b.shape == s.shape
        assert rel(b, s) <= tol


@pytest.mark.parametrize("name,make,shapes", layer_cases(), ids=[c[0] for c in layer_cases()])
def test_layer_backward_pass_matches_autograd(name, make, shapes):
    """Each layer's inversion-based backward gives autograd's gradients (float64) and rebuilds its input."""
    torch.manual_seed(1)
    layer = randomise(make()).double()
    state = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    temb = torch.randn(2, TEMB, dtype=torch.float64, requires_grad=True)
    out = layer(state, temb)
    gouts = [torch.randn_like(o) for o in out]
    params = layer.trainable()
    ref = torch.autograd.grad(out, state + [temb] + params, gouts, allow_unused=True)

    with torch.no_grad():
        out_d = [o.detach().clone() for o in out]
    in_state, grad_in, g_temb, pgrads = layer.backward_pass(out_d, [g.clone() for g in gouts], temb.detach())
    for s, r in zip(in_state, state):
        assert rel(s, r.detach()) <= 1e-10
    for g, r in zip(grad_in, ref[: len(state)]):
        assert rel(g, r) <= 1e-8
    r_temb = ref[len(state)]
    if r_temb is None:
        assert g_temb is None or float(g_temb.abs().max()) == 0.0
    else:
        assert rel(g_temb, r_temb) <= 1e-8
    assert len(pgrads) == len(params)
    for g, r in zip(pgrads, ref[len(state) + 1 :]):
        assert rel(g, r) <= 1e-8


def test_core_inverse_recovers_input_float64_and_float32():
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        torch.manual_seed(0)
        # scale 0.1 moves the output far from the input (relative change ~2) without exploding it
        core = randomise(InvertibleUNetCore(8, 2, 2, TEMB, attention=True, attn_full_max_tokens=64, attention_min_level=0), scale=0.1).to(dtype)
        x = torch.randn(2, 8, 16, 16, 16, dtype=dtype)
        temb = torch.randn(2, TEMB, dtype=dtype)
        with torch.no_grad():
            y = core(x, temb)
            assert y.shape == x.shape
            assert rel(y, x) > 0.5
            assert rel(core.inverse(y, temb), x) <= tol


def test_haar_matrix_is_orthogonal_and_the_haar_transform():
    h = haar_matrix(2)
    assert torch.allclose(h @ h.T, torch.eye(16, dtype=h.dtype), atol=1e-14)
    # the first filter of each channel is the 2x2x2 average (scaled): all eight taps equal 1/sqrt(8)
    assert torch.allclose(h[0, :8], torch.full((8,), 8 ** -0.5, dtype=h.dtype))
    assert torch.count_nonzero(h[0, 8:]) == 0
    # a constant block goes entirely into the low-pass channel
    block = torch.ones(16, dtype=h.dtype)
    coeffs = h @ block
    assert torch.allclose(coeffs[[0, 8]], torch.full((2,), 8 ** 0.5, dtype=h.dtype))
    assert torch.allclose(coeffs[[i for i in range(16) if i not in (0, 8)]], torch.zeros(14, dtype=h.dtype), atol=1e-14)


def test_downsampling_is_haar_at_init_and_conserves_energy():
    layer = SplitDownsample(8)
    w = layer.resample.matrix().detach().double()
    assert torch.allclose(w, haar_matrix(2), atol=1e-7)
    x = torch.randn(1, 8, 4, 4, 4)
    with torch.no_grad():
        low = layer([x], torch.zeros(1, TEMB))[-1]
    assert low.shape == (1, 16, 2, 2, 2)
    # orthogonal: the norm of the part sent down is preserved
    assert abs(float(low.norm()) - float(x[:, 6:].norm())) <= 1e-5 * float(x[:, 6:].norm())
    # channel 0 of the low-pass output is the scaled mean of the first 2x2x2 block of channel 6
    assert torch.allclose(low[0, 0, 0, 0, 0], x[0, 6, :2, :2, :2].sum() / 8 ** 0.5, atol=1e-5)


def test_checkerboard_mask():
    m = checkerboard((2, 2, 2))
    assert m.shape == (1, 1, 2, 2, 2)
    assert int(m.sum()) == 4
    assert m[0, 0, 0, 0, 0] == 0 and m[0, 0, 0, 0, 1] == 1 and m[0, 0, 1, 1, 1] == 1


def test_attention_uses_windows_above_threshold():
    layer = CheckerboardAttentionCoupling(6, TEMB, window=4, full_max_tokens=64)
    assert layer.A.windows((4, 4, 4)) == (4, 4, 4)  # 64 tokens: whole volume
    assert layer.A.windows((8, 8, 8)) == (4, 4, 4)  # windowed
    assert layer.A.windows((8, 6, 8)) == (4, 2, 4)  # a side that 4 does not divide


def test_attention_output_depends_only_on_the_unmasked_voxels():
    """y = x + m * A((1 - m) * x): changing masked voxels of x changes y only at those voxels."""
    torch.manual_seed(0)
    layer = randomise(CheckerboardAttentionCoupling(6, TEMB, full_max_tokens=512))
    net, temb = layer.A, torch.randn(1, TEMB)
    x = torch.randn(1, 6, 4, 4, 4)
    m = checkerboard(x.shape[2:])
    x2 = x + m * torch.randn_like(x)
    with torch.no_grad():
        a1 = net(x, temb)
        a2 = net(x2, temb)
    assert torch.allclose(a1, a2, atol=1e-6)
    assert float(((1 - m) * a1).abs().max()) == 0.0
