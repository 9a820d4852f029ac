"""Every built-in model under ``torch.nn.parallel.DistributedDataParallel``: 2 CPU processes, ``gloo``,
float64, tiny preset, 16^3 volumes, the shared diffusion loss (:func:`idmbench.diffusion.diffusion_loss`).

DDP averages the gradients of the ranks' losses; each rank's loss is the mean over its own batch, so after
the all-reduce the gradients must equal one process's gradients of the mean loss over the concatenated
batch. The inputs are fixed: the clean volumes, the noise and the timesteps, and the patch recipe's origin
(drawn from a generator seeded the same in every process, so PatchDDM's patch sits at the same place on
both ranks and in the one-process reference). Every parameter is moved off its initialisation first:
zero-initialised output convolutions would otherwise leave most gradients at zero and prove nothing.

Checked per model (one ``torch.multiprocessing.spawn`` for all of them):

* DDP(find_unused_parameters=False) equals the one-process gradients (relative error <= 1e-8), and rank 1,
  built from another seed, holds rank 0's parameters after DDP's construction-time broadcast;
* the same with ``static_graph=True`` over two iterations (the first records the graph, the second uses it);
* ``no_sync()`` accumulation over two micro-batches per rank, then a synced backward, equals one step on all
  four volumes (the accumulated gradient is the sum of two means: divided by 2 before comparing).

IDM runs with its memory-saving backward on (the default), the case reversible networks are known to break:
a backward that calls autograd inside autograd marks DDP's variables ready twice.
"""

from __future__ import annotations

import json
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import idmbench

pytestmark = pytest.mark.slow

#: the built-in models (every one must train under DDP)
MODELS = ("idm", "unet", "unet-ckpt", "patchddm", "wdm")
WORLD = 2
SIDE = 16
TOL = 1e-8
#: per-parameter errors are relative to at least this fraction of the whole gradient's norm (see _compare)
ZERO_FLOOR = 1e-6
TIMESTEPS = (17, 250, 600, 933)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _build(name: str, seed: int) -> torch.nn.Module:
    """The tiny model in float64 built from ``seed``, every parameter moved off its init by the same draw."""
    torch.manual_seed(seed)
    model = idmbench.create_model(name, preset="tiny").double()
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model


class _Case:
    """Fixed inputs of one model: 4 clean volumes, their noise (the training example's shape) and timesteps."""

    def __init__(self, name: str) -> None:
        from idmbench.diffusion import make_train_scheduler, training_example

        self.name = name
        self.spec = idmbench.get_spec(name)
        self.cfg = self.spec.config("tiny")
        self.sched = make_train_scheduler(prediction_type=self.spec.prediction_type)
        g = torch.Generator().manual_seed(7)
        self.x0 = torch.randn((len(TIMESTEPS), 1, SIDE, SIDE, SIDE), generator=g, dtype=torch.float64)
        example = training_example(self.spec, self.x0[:1], self.cfg, self._origin_generator())
        z0 = self.spec.get_recipe().encode(example.x0, self.cfg)
        self.noise = torch.randn((len(TIMESTEPS),) + tuple(z0.shape[1:]), generator=g, dtype=torch.float64)
        self.t = torch.tensor(TIMESTEPS, dtype=torch.long)

    @staticmethod
    def _origin_generator() -> torch.Generator:
        # the patch recipe draws its origin first: the same seed everywhere puts the patch at the same place
        return torch.Generator().manual_seed(99)

    def loss(self, model: torch.nn.Module, idx: list[int]) -> torch.Tensor:
        from idmbench.diffusion import diffusion_loss

        return diffusion_loss(model, self.x0[idx], self.sched, spec=self.spec, cfg=self.cfg,
                              generator=self._origin_generator(), noise=self.noise[idx], timesteps=self.t[idx])

    def reference(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """One process's gradients of the mean loss over the volumes ``idx``."""
        model = _build(self.name, 0)
        self.loss(model, idx).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}


def _compare(model: torch.nn.Module, ref: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, float | int]:
    """Overall and worst per-parameter relative error of ``model``'s gradients (x ``scale``) against ``ref``.

    A parameter's error is relative to its own reference gradient, floored at ``ZERO_FLOOR`` x the whole
    gradient's norm: some gradients are zero in exact arithmetic (a key bias under softmax, a bias right
    before a normalisation) and only rounding noise (~1e-17) in float64.
    """
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    names = [n for n, _ in model.named_parameters() if n not in missing]
    got = {n: p.grad * scale for n, p in model.named_parameters() if n in names}
    flat_got = torch.cat([got[n].flatten() for n in names])
    flat_ref = torch.cat([ref[n].flatten() for n in names])
    floor = ZERO_FLOOR * float(flat_ref.norm())
    worst = max((float((got[n] - ref[n]).norm()) / max(float(ref[n].norm()), floor) for n in names), default=0.0)
    return {"rel": rel(flat_got, flat_ref), "worst_param_rel": worst, "missing_grads": len(missing),
            "ref_norm": float(flat_ref.norm())}


def _check(name: str, rank: int) -> dict[str, object]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    case = _Case(name)
    out: dict[str, object] = {}
    ref2 = case.reference([0, 1])

    # 1. plain DDP: rank r takes volume r; rank 1 starts from other weights, DDP broadcasts rank 0's
    ddp = DDP(_build(name, rank), find_unused_parameters=False)
    ref_params = dict(_build(name, 0).named_parameters())
    out["params_broadcast_rel"] = max(rel(p.detach(), ref_params[n].detach())
                                      for n, p in ddp.module.named_parameters())
    case.loss(ddp, [rank]).backward()
    out["ddp"] = _compare(ddp.module, ref2)
    # a second synced iteration (DDP checks here that the first one finished its reduction)
    ddp.zero_grad(set_to_none=True)
    case.loss(ddp, [rank]).backward()
    out["ddp_second_iteration"] = _compare(ddp.module, ref2)

    # 2. static_graph=True: iteration 1 records the graph, iteration 2 runs on it
    ddp_s = DDP(_build(name, rank), find_unused_parameters=False, static_graph=True)
    errs = []
    for _ in range(2):
        ddp_s.zero_grad(set_to_none=True)
        case.loss(ddp_s, [rank]).backward()
        errs.append(_compare(ddp_s.module, ref2))
    out["static_graph"] = max(errs, key=lambda e: e["rel"])

    # 3. gradient accumulation: no_sync over micro-batch 1, synced backward over micro-batch 2
    ref4 = case.reference([0, 1, 2, 3])
    ddp_a = DDP(_build(name, rank), find_unused_parameters=False)
    with ddp_a.no_sync():
        case.loss(ddp_a, [2 * rank]).backward()
    local_after_first = {n: p.grad.clone() for n, p in ddp_a.module.named_parameters()}
    case.loss(ddp_a, [2 * rank + 1]).backward()
    out["no_sync"] = _compare(ddp_a.module, ref4, scale=0.5)
    # the no_sync backward really stayed local: rank r's gradient then was its own volume's alone
    own = _Case(name)
    single = _build(name, 0)
    own.loss(single, [2 * rank]).backward()
    out["no_sync_local_rel"] = rel(torch.cat([local_after_first[n].flatten() for n, _ in single.named_parameters()]),
                                   torch.cat([p.grad.flatten() for _, p in single.named_parameters()]))
    return out


def _rank_main(rank: int, world: int, port: int, out_dir: str, models: tuple[str, ...]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=180))
    results: dict[str, object] = {}
    try:
        for name in models:
            try:
                results[name] = _check(name, rank)
            except Exception:  # noqa: BLE001 - recorded and asserted by the test with its traceback
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results, indent=1))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict[int, dict[str, dict]]:
    """Run every check in one spawn of 2 gloo processes; ``{rank: {model: checks}}``."""
    import torch.multiprocessing as mp

    models = tuple(m for m in MODELS if m in idmbench.list_models())
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank_main, args=(WORLD, _free_port(), str(out), models), nprocs=WORLD, join=True)
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)}


def _get(results: dict, rank: int, model: str) -> dict:
    r = results[rank].get(model)
    assert r is not None, f"{model} was not checked on rank {rank}"
    assert "error" not in r, f"{model} failed under DDP on rank {rank}:\n{r['error']}"
    return r


def test_every_builtin_model_is_checked():
    assert set(MODELS) <= set(idmbench.list_models()), "a built-in model is missing from the registry"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("rank", range(WORLD))
def test_ddp_gradients_equal_one_process_on_the_combined_batch(ddp_results, model, rank):
    r = _get(ddp_results, rank, model)
    assert r["params_broadcast_rel"] == 0.0, "DDP did not start every rank from rank 0's parameters"
    for key in ("ddp", "ddp_second_iteration"):
        c = r[key]
        assert c["missing_grads"] == 0, (key, c)
        assert c["ref_norm"] > 0, (key, c)
        assert c["rel"] <= TOL and c["worst_param_rel"] <= TOL, (model, key, c)


@pytest.mark.parametrize("model", MODELS)
def test_static_graph(ddp_results, model):
    for rank in range(WORLD):
        c = _get(ddp_results, rank, model)["static_graph"]
        assert c["missing_grads"] == 0 and c["rel"] <= TOL and c["worst_param_rel"] <= TOL, (model, rank, c)


@pytest.mark.parametrize("model", MODELS)
def test_no_sync_accumulation_equals_one_step_on_both_micro_batches(ddp_results, model):
    for rank in range(WORLD):
        r = _get(ddp_results, rank, model)
        c = r["no_sync"]
        assert c["missing_grads"] == 0 and c["rel"] <= TOL and c["worst_param_rel"] <= TOL, (model, rank, c)
        # inside no_sync nothing was all-reduced: the gradient was the rank's own micro-batch's
        assert r["no_sync_local_rel"] <= TOL, (model, rank, r["no_sync_local_rel"])
