"""IDM end to end: exact gradients, reconstruction during training, activation memory, bad input."""

from __future__ import annotations

import pytest
import torch

import idmbench
from idmbench.diffusion import make_optimizer, make_train_scheduler, training_step
from idmbench.invertible.layers import SplitDownsample, UpsampleMerge, haar_matrix
from idmbench.measure.memory import training_activation_bytes


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def twin_models(dtype=torch.float64, **overrides):
    """The memory-saving IDM and its plain-autograd twin, moved off init identically."""
    nets = []
    for me in (True, False):
        torch.manual_seed(0)
        nets.append(idmbench.create_model("idm", preset="tiny", memory_efficient=me, **overrides).to(dtype))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pa, pb in zip(nets[0].parameters(), nets[1].parameters()):
            assert torch.equal(pa, pb)  # same parameters for the same seed
            r = torch.randn(pa.shape, generator=g, dtype=dtype) * 0.1
            pa.add_(r)
            pb.add_(r)
    return nets


def test_registered_with_presets():
    assert "idm" in idmbench.list_models()
    spec = idmbench.get_spec("idm")
    assert {"tiny", "small", "paper"} <= set(spec.presets)
    counts = {p: idmbench.count_parameters(idmbench.create_model("idm", preset=p)) for p in ("tiny", "small", "paper")}
    assert counts["tiny"] < counts["small"] < counts["paper"]
    assert 20e6 <= counts["paper"] <= 30e6  # comparable to PatchDDM-3D's ~24 M


def test_gradients_equal_plain_autograd_float64():
    me, plain = twin_models()
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    t = torch.tensor([10, 700])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la = me(xa, t).square().mean()
    lb = plain(xb, t).square().mean()
    assert abs(float(la) - float(lb)) <= 1e-12 * abs(float(lb))
    la.backward()
    lb.backward()
    assert rel(xa.grad, xb.grad) <= 1e-8
    checked = 0
    for (name, pa), pb in zip(me.named_parameters(), plain.parameters()):
        assert pa.grad is not None, name
        assert float(pb.grad.norm()) > 0, f"{name} gets no gradient"
        assert rel(pa.grad, pb.grad) <= 1e-8, name
        checked += 1
    assert checked == len(list(plain.parameters()))
    # the time MLP is reached through the memory-saving Function
    assert float(me.time_mlp[0].weight.grad.norm()) > 0


def test_gradients_equal_plain_autograd_float32():
    me, plain = twin_models(torch.float32)
    x = torch.randn(1, 1, 16, 16, 16)
    t = torch.tensor([300])
    me(x, t).square().mean().backward()
    plain(x, t).square().mean().backward()
    for (name, pa), pb in zip(me.named_parameters(), plain.parameters()):
        assert rel(pa.grad, pb.grad) <= 1e-4, name


def test_each_parameter_gradient_arrives_once():
    """Gradients leave through the autograd.Function: one hook call per parameter (what DDP relies on)."""
    model = idmbench.create_model("idm", preset="tiny")
    calls: dict[str, int] = {}
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    model(torch.randn(1, 1, 8, 8, 8), torch.tensor([3])).square().mean().backward()
    assert set(calls) == {n for n, _ in model.named_parameters()}
    assert set(calls.values()) == {1}


def test_reconstruction_stays_exact_during_training():
    torch.manual_seed(0)
    model = idmbench.create_model("idm", preset="tiny")
    opt = make_optimizer(model, lr=1e-3)
    sched = make_train_scheduler()
    x0 = torch.randn(2, 1, 16, 16, 16)
    t = torch.tensor([50, 900])
    assert model.reconstruction_error(x0, t) <= 1e-5
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        training_step(model, opt, x0, sched, spec="idm", generator=gen)
    err = model.reconstruction_error(torch.randn(2, 1, 16, 16, 16), t)
    assert err <= 1e-4
    # training moved the network away from the identity it starts as
    h = model.lift(x0)
    with torch.no_grad():
        assert rel(model.core.run(h, model.time_embedding(t, 2, x0.device)), h) > 1e-3
    # and the learnable resampling stays orthogonal
    for layer in model.core.layers:
        if isinstance(layer, (SplitDownsample, UpsampleMerge)):
            w = layer.resample.matrix().detach()
            assert float((w.T @ w - torch.eye(w.shape[0])).abs().max()) <= 1e-5
            assert float((w - haar_matrix(layer.resample.channels, dtype=w.dtype)).abs().max()) > 1e-6  # it learned


def test_resampling_is_haar_at_initialisation():
    model = idmbench.create_model("idm", preset="tiny")
    found = 0
    for layer in model.core.layers:
        if isinstance(layer, (SplitDownsample, UpsampleMerge)):
            w = layer.resample.matrix().detach().double()
            assert torch.allclose(w, haar_matrix(layer.resample.channels), atol=1e-7)
            found += 1
    assert found == 2 * model.levels


def activation(model, size=16):
    x = torch.randn(1, 1, size, size, size)
    return training_activation_bytes(model, x, torch.tensor([10])).activation_bytes


@pytest.mark.slow
def test_activation_memory_does_not_grow_with_depth_and_beats_plain_autograd():
    base = dict(preset="small", base_channels=8)
    a2 = activation(idmbench.create_model("idm", blocks_per_level=2, **base))
    a8 = activation(idmbench.create_model("idm", blocks_per_level=8, **base))
    plain8 = activation(idmbench.create_model("idm", blocks_per_level=8, memory_efficient=False, **base))
    assert a8 <= 1.10 * a2
    assert a8 <= plain8 / 3
    # nor with the number of levels (deeper levels add parameters, not stored activations)
    l2 = activation(idmbench.create_model("idm", levels=2, **base))
    l4 = activation(idmbench.create_model("idm", levels=4, **base))
    assert l4 <= 1.10 * l2


def test_bad_inputs_raise_clear_errors():
    model = idmbench.create_model("idm", preset="tiny")  # levels=2: sides divisible by 4
    t = torch.tensor([1])
    with pytest.raises(ValueError, match=r"IDM with levels=2 needs every side divisible by 4; got \(30, 32, 32\)"):
        model(torch.randn(1, 1, 30, 32, 32), t)
    with pytest.raises(ValueError, match="in_channels=1 got 2 channels"):
        model(torch.randn(1, 2, 8, 8, 8), t)
    with pytest.raises(ValueError, match=r"5D tensor \(B, C, D, H, W\); got shape \(1, 8, 8, 8\)"):
        model(torch.randn(1, 8, 8, 8), t)
    with pytest.raises(ValueError, match="timesteps must have shape"):
        model(torch.randn(2, 1, 8, 8, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="base_channels must be divisible by 4"):
        idmbench.create_model("idm", preset="tiny", base_channels=6)
    with pytest.raises(ValueError, match="unknown model 'nope'; valid models: .*idm"):
        idmbench.create_model("nope")
    with pytest.raises(ValueError, match="idm needs every side divisible by 4"):
        idmbench.get_spec("idm").check_size((30, 32, 32), idmbench.get_spec("idm").config("tiny"))


def test_timesteps_broadcast_and_keyword_call():
    torch.manual_seed(0)
    model = idmbench.create_model("idm", preset="tiny", memory_efficient=False)
    x = torch.randn(3, 1, 8, 8, 8)
    with torch.no_grad():
        a = model(x=x, timesteps=torch.tensor([42]), context=None)
        b = model(x, torch.tensor([42, 42, 42]))
    assert a.shape == x.shape
    assert torch.equal(a, b)


def test_monai_diffusion_inferer():
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDPMScheduler

    torch.manual_seed(0)
    model = idmbench.create_model("idm", preset="tiny")
    sched = DDPMScheduler(num_train_timesteps=1000)
    inferer = DiffusionInferer(sched)
    x = torch.randn(1, 1, 8, 8, 8)
    noise = torch.randn_like(x)
    t = torch.randint(0, 1000, (1,))
    pred = inferer(inputs=x, diffusion_model=model, noise=noise, timesteps=t)
    assert pred.shape == x.shape
    torch.nn.functional.mse_loss(pred, noise).backward()
    assert model.lift.weight.grad is not None
    sched.set_timesteps(num_inference_steps=3)
    with torch.no_grad():
        out = inferer.sample(input_noise=torch.randn(1, 1, 8, 8, 8), diffusion_model=model, scheduler=sched, verbose=False)
    assert out.shape == (1, 1, 8, 8, 8)


def test_memory_saving_backward_under_autocast():
    """The recompute runs under the forward's autocast state: gradients match the plain twin's under bf16."""
    me, plain = twin_models(torch.float32)
    x = torch.randn(1, 1, 16, 16, 16)
    t = torch.tensor([200])
    for m in (me, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(x, t).float().square().mean()
        loss.backward()
    for (name, pa), pb in zip(me.named_parameters(), plain.parameters()):
        assert rel(pa.grad, pb.grad) <= 2e-2, name


def test_second_backward_through_the_same_graph_is_refused_loudly():
    """IDM's backward rebuilds the input in place in the saved output: a retained graph can't be reused
    silently -- autograd's in-place check refuses it."""
    model = idmbench.create_model("idm", preset="tiny")
    loss = model(torch.randn(1, 1, 8, 8, 8), torch.tensor([5])).square().mean()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_core_without_consume_output_supports_retain_graph():
    from idmbench.invertible import InvertibleUNetCore

    torch.manual_seed(0)
    core = InvertibleUNetCore(8, 2, 1, 12)
    with torch.no_grad():
        for p in core.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(1, 8, 8, 8, 8, requires_grad=True)
    y = core(x, torch.randn(1, 12))
    y_before = y.detach().clone()
    loss = y.square().mean()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in core.parameters()]
    core.zero_grad()
    loss.backward()
    for a, p in zip(first, core.parameters()):
        assert torch.equal(a, p.grad)
    assert torch.equal(y.detach(), y_before)  # the caller's output is left alone


def test_training_step_benchmark(benchmark):
    """Microbenchmark of one IDM training step at 16^3 (``--benchmark-disable`` in CI: it only runs)."""
    torch.manual_seed(0)
    model = idmbench.create_model("idm", preset="tiny")
    opt = make_optimizer(model, lr=1e-4)
    sched = make_train_scheduler()
    x0 = torch.randn(1, 1, 16, 16, 16)
    loss = benchmark(lambda: training_step(model, opt, x0, sched, spec="idm"))
    assert loss == loss and loss > 0  # a finite, positive MSE
