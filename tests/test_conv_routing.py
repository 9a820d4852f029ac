"""Every model measured on the same CPU convolution kernels: IDM's sub-networks call oneDNN directly, and
the benchmark processes route every other ``nn.Conv3d`` (baselines, plugins) the same way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from idmbench.invertible import conv


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, padding=(1, 0, 1)), dict(padding=2, dilation=2),
                                dict(padding=1, groups=2), dict(padding="same")])
def test_conv3d_any_equals_pytorchs_conv3d_with_gradients(kw):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 12, 10, 14, requires_grad=True)  # batch 1, narrow: PyTorch's own picks im2col here
    w = torch.randn(6, 4 // kw.get("groups", 1), 3, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    ref = conv._F_CONV3D(x, w, b, **kw)
    out = conv.conv3d_any(x, w, b, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    g_ref = torch.autograd.grad(ref.square().sum(), (x, w, b))
    g_out = torch.autograd.grad(out.square().sum(), (x, w, b))
    for a, r in zip(g_out, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not conv._ONEDNN, reason="this PyTorch build has no oneDNN")
def test_the_benchmark_routes_a_baselines_convolutions_through_onednn_and_restores_pytorchs_own():
    layer = torch.nn.Conv3d(4, 8, 3, padding=1)
    x = torch.randn(1, 4, 16, 16, 16)
    assert "aten::mkldnn_convolution" not in _ops(lambda: layer(x))  # PyTorch's heuristic: im2col
    with conv.onednn_for_every_conv3d():
        assert F.conv3d is conv.conv3d_any
        assert "aten::mkldnn_convolution" in _ops(lambda: layer(x))
    assert F.conv3d is conv._F_CONV3D
    with conv.onednn_for_every_conv3d(enabled=False):
        assert F.conv3d is conv._F_CONV3D


def test_routing_leaves_fake_tensor_predictions_and_float64_alone():
    from idmbench.measure.memory import fake_mode

    layer = torch.nn.Conv3d(4, 8, 3, padding=1)
    with conv.onednn_for_every_conv3d():
        with fake_mode():
            y = layer(torch.randn(1, 4, 8, 8, 8))
        assert y.shape == (1, 8, 8, 8, 8)
        d = layer.double()
        assert "aten::mkldnn_convolution" not in _ops(lambda: d(torch.randn(1, 4, 8, 8, 8, dtype=torch.float64)))


def test_run_json_says_which_cpu_kernels_every_model_ran_on():
    from idmbench.measure.env import capture

    env = capture("cpu")
    assert env["cpu_conv3d"] == (conv.ROUTING_NOTE if conv._ONEDNN else "PyTorch's default (oneDNN not available in this build)")
