"""FSDP2 (``fully_shard``) on two CPU processes (gloo) against one process on the global batch.

One launch of two workers (this file run as a script) runs every scenario: plain ``fully_shard``
on the trunk and the root, and Accelerate's FSDP2 plugin. Each worker saves, per scenario, the
final parameters (gathered: ``full_tensor()``) and each optimizer step's Gramian and weights;
the tests compare them with one process here, on the global batch, with no sharding at all.

The model's layers have odd sizes, so the shards of the two ranks differ in size.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mtlhooks import MTL, ConfigError, DistributedError, InputError, registry, support
from mtlhooks.plugin import Family, Need, Space

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plugin_entries import entry
from test_distributed import ROOT, WORLD, launch

TASKS = ("t0", "t1", "t2")
STATIC = {"name": "static", "weights": {"t0": 1.0, "t1": 0.5, "t2": 2.0}}


class Net(nn.Module):
    """A tanh trunk (odd widths: uneven shards) and one linear head per task."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.encoder = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(7, 2) for t in TASKS})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.encoder(x)
        return z, {t: head(z) for t, head in self.heads.items()}


def data(total: int = 160) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(total, 6, generator=generator, dtype=torch.float64)
    maps = {
        t: torch.randn(6, 2, generator=generator, dtype=torch.float64) * (i + 1)
        for i, t in enumerate(TASKS)
    }
    return x, {t: torch.tanh(x @ m) * 3 for t, m in maps.items()}


def losses_of(outputs: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {t: (outputs[t] - y[t]).pow(2).mean() for t in TASKS}


def spec(config: dict[str, Any], **options: Any) -> dict[str, Any]:
    out = {
        "config": {"tasks": TASKS, "seed": 3, **config},
        "steps": 3,
        "batch": 16,
        "accumulation": 1,
        "split": None,  # rows of rank 0 in each (micro-)batch; None: half
        "batch_size_arg": False,
        "momentum": 0.0,
        "mixed_precision": False,  # MixedPrecisionPolicy(param_dtype=float32, reduce_dtype=f64)
        "build_before_shard": False,  # MTL built before fully_shard replaces the parameters
        "accelerate": False,  # through Accelerate's FSDP2 plugin
        "reference_micro_steps": False,  # the reference accumulates as the workers do
        "plain_loop": False,  # Accelerate without mtl.accumulate (one micro-step only)
    }
    out.update(options)
    return out


def _gramian_methods() -> list[str]:
    """Every built-in aggregator and norm balancer that works from the Gramian in space params
    (torchjd needs the name of a TorchJD method: it has its own tests)."""
    names = []
    for info in registry.available_plugins():
        if info.family not in (Family.AGGREGATOR, Family.NORM_BALANCING) or info.name == "torchjd":
            continue
        if info.cls.needs is Need.GRAMIAN and Space.PARAMS in info.spaces:
            names.append(info.name)
    return names


SCENARIOS: dict[str, dict[str, Any]] = {
    **{
        f"params_{name}": spec({"plugins": [STATIC, entry(name)], "space": "params"})
        for name in _gramian_methods()
    },
    "params_avgnorm_mgda_accumulate": spec(
        {"plugins": ["avgnorm", "mgda"], "space": "params"}, accumulation=2
    ),
    "params_gradstats_every2": spec(
        {"plugins": [STATIC, {"name": "gradstats", "every": 2}], "space": "params"}, steps=4
    ),
    "params_unweighted_heads": spec(
        {"plugins": [STATIC, "mgda"], "space": "params", "task_specific": "unweighted"}
    ),
    "params_weighted_heads": spec(
        {"plugins": [STATIC, "upgrad"], "space": "params", "task_specific": "weighted"}
    ),
    "params_uneven": spec(
        {"plugins": ["pcgrad"], "space": "params"}, split=10, batch_size_arg=True
    ),
    "params_built_before_shard": spec(
        {"plugins": ["pcgrad"], "space": "params"}, build_before_shard=True
    ),
    "params_mixed_precision": spec({"plugins": ["mgda"], "space": "params"}, mixed_precision=True),
    "features_mgda": spec({"plugins": ["mgda"], "space": "features"}),
    "features_mgda_accumulate": spec(
        {"plugins": ["mgda"], "space": "features"}, accumulation=2, reference_micro_steps=True
    ),
    "last_shared_avgnorm_pcgrad": spec({"plugins": ["avgnorm", "pcgrad"], "space": "last_shared"}),
    "none_dwa": spec({"plugins": [{"name": "dwa", "temperature": 0.5}]}, steps=4),
    "acc_params_pcgrad_accumulate": spec(
        {"plugins": ["pcgrad", "gradstats"], "space": "params"}, accumulation=2, accelerate=True
    ),
    "acc_features_mgda": spec({"plugins": ["mgda"], "space": "features"}, accelerate=True),
    # A loop without mtl.accumulate: the pipeline meets prepare's parameters after a forward.
    "acc_last_shared_avgnorm": spec(
        {"plugins": ["avgnorm", "mgda"], "space": "last_shared"}, accelerate=True, plain_loop=True
    ),
}
CHECKPOINT = spec(
    {"plugins": [{"name": "dwa"}, {"name": "avgnorm", "ema": 0.5}, "pcgrad"], "space": "params"},
    steps=5,
    momentum=0.9,
)
CHECKPOINT_AFTER = 2


def _rows(spec: dict[str, Any], step: int, rank: int, world: int, micro: int) -> list[slice]:
    batch = spec["batch"]
    size = batch // micro
    out = []
    for k in range(micro):
        start = step * batch + k * size
        if world == 1:
            out.append(slice(start, start + size))
            continue
        cut = spec["split"] if spec["split"] is not None else size // 2
        out.append(slice(start, start + cut) if rank == 0 else slice(start + cut, start + size))
    return out


def _full(tensor: torch.Tensor) -> torch.Tensor:
    full = getattr(tensor, "full_tensor", None)
    return (full() if full is not None else tensor).detach().clone()


def _record(report: Any) -> dict[str, Any]:
    def copy_of(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.detach().double().clone()

    return {"weights": copy_of(report.weights), "gramian": copy_of(report.gramian)}


# -- the single-process reference -------------------------------------------------------------


def reference(spec: dict[str, Any], steps: range | None = None) -> dict[str, Any]:
    """One process, no sharding, the global batch (each optimizer step at once, unless the
    scenario's reference accumulates like the workers). With mixed precision: the forward and
    the per-task gradients in float32, on a float32 copy of the float64 parameters (what
    ``MixedPrecisionPolicy(param_dtype=float32)`` computes), applied in float64."""
    x_all, y_all = data()
    model = Net().double()
    micro = spec["accumulation"] if spec["reference_micro_steps"] else 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=spec["momentum"])
    compute = Net().float() if spec["mixed_precision"] else model
    mtl = MTL(spec["config"], shared=compute.encoder, communicator=False)
    reports = []
    for step in range(spec["steps"]):
        if compute is not model:
            compute.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        for k, rows in enumerate(_rows(spec, step, 0, 1, micro)):
            x, y = x_all[rows], {t: v[rows] for t, v in y_all.items()}
            z, outputs = compute(x.to(next(compute.parameters()).dtype))
            losses = {t: v / micro for t, v in losses_of(outputs, y).items()}
            report = mtl.backward(losses, features=z, sync=k == micro - 1)
        reports.append(_record(report))
        if compute is not model:
            for p, q in zip(model.parameters(), compute.parameters()):
                p.grad = None if q.grad is None else q.grad.double()
                q.grad = None
        optimizer.step()
        optimizer.zero_grad()
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "reports": reports,
    }


# -- the workers ------------------------------------------------------------------------------


def _shard(model: Net, mixed_precision: bool = False) -> Net:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float64)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    fully_shard(model.encoder, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _gradient_sync(net: nn.Module, on: bool) -> None:
    set_sync = getattr(net, "set_requires_gradient_sync", None)
    if set_sync is not None:
        set_sync(on)


def train(spec: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """Plain FSDP2: ``fully_shard`` on the trunk and the root; the forward of a micro-step that
    does not synchronise runs with FSDP's gradient sync off (as a loop accumulating with
    ``no_sync`` does; space params reduces its per-task gradients all the same)."""
    x_all, y_all = data()
    model = Net().double()
    micro = spec["accumulation"]
    if spec["build_before_shard"]:
        mtl = MTL(spec["config"], shared=model.encoder, model=model)
        _shard(model)
    else:
        _shard(model, spec["mixed_precision"])
        mtl = MTL(spec["config"], shared=model.encoder, model=model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=spec["momentum"])
    reports = []
    for step in range(spec["steps"]):
        for k, rows in enumerate(_rows(spec, step, rank, world, micro)):
            sync = k == micro - 1
            _gradient_sync(model, sync)
            x, y = x_all[rows], {t: v[rows] for t, v in y_all.items()}
            z, outputs = model(x)
            losses = {t: v / micro for t, v in losses_of(outputs, y).items()}
            options = {"batch_size": len(x)} if spec["batch_size_arg"] else {}
            report = mtl.backward(losses, features=z, sync=sync, **options)
        reports.append(_record(report))
        optimizer.step()
        optimizer.zero_grad()
    return {
        "params": {n: _full(p) for n, p in model.named_parameters()},
        "reports": reports,
        "needs_no_sync": mtl.needs_no_sync,
    }


def train_accelerate(spec: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """Accelerate's FSDP2 plugin. Accelerate enables FSDP only on accelerators: on CPU its
    state is set to FSDP after ``Accelerator(cpu=True)``, and ``prepare`` then shards the model
    with ``fully_shard`` as it does on GPUs (parameters replaced, optimizer switched)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from mtlhooks.integrations.accelerate import AcceleratedMTL

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Sequential"],
        reshard_after_forward=True,
    )
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=spec["accumulation"])
    # Both singletons: AcceleratorState copies PartialState's type when it is built again.
    PartialState().distributed_type = DistributedType.FSDP
    AcceleratorState().distributed_type = DistributedType.FSDP
    AcceleratorState().fsdp_plugin = plugin
    x_all, y_all = data()
    model = Net().double()
    # Built before prepare, as usual with Accelerate: it follows the parameters prepare
    # replaces.
    mtl = AcceleratedMTL(accelerator, spec["config"], shared=model.encoder, model=model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    net, optimizer = accelerator.prepare(model, optimizer)
    reports = []
    for step in range(spec["steps"]):
        for rows in _rows(spec, step, rank, world, spec["accumulation"]):
            x, y = x_all[rows], {t: v[rows] for t, v in y_all.items()}
            with nullcontext() if spec["plain_loop"] else mtl.accumulate(net):
                z, outputs = net(x)
                report = mtl.backward(losses_of(outputs, y), features=z)
                optimizer.step()
                optimizer.zero_grad()
        reports.append(_record(report))
    sharded = all(type(p).__name__ == "DTensor" for p in net.parameters())
    return {
        "params": {n: _full(p) for n, p in net.named_parameters()},
        "reports": reports,
        "sharded": sharded,
        "distributed_type": str(accelerator.distributed_type),
    }


def train_checkpointed(rank: int, world: int) -> dict[str, Any]:
    """5 steps straight, and 2 steps then a resume from ``get_state_dict`` (model, optimizer)
    and ``mtl.state_dict()`` into a fresh model, optimizer and pipeline; the last 3 steps also
    with a fresh pipeline (no mtlhooks state), which must differ."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    x_all, y_all = data()
    spec = CHECKPOINT

    def build() -> tuple[Net, torch.optim.Optimizer, MTL]:
        model = _shard(Net().double())
        mtl = MTL(spec["config"], shared=model.encoder, model=model)
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), mtl

    def run(model: Net, optimizer: torch.optim.Optimizer, mtl: MTL, steps: range) -> None:
        for step in steps:
            (rows,) = _rows(spec, step, rank, world, 1)
            _z, outputs = model(x_all[rows])
            mtl.backward(losses_of(outputs, {t: v[rows] for t, v in y_all.items()}))
            optimizer.step()
            optimizer.zero_grad()

    model, optimizer, mtl = build()
    run(model, optimizer, mtl, range(CHECKPOINT_AFTER))
    saved_model, saved_optimizer = copy.deepcopy(get_state_dict(model, optimizer))
    saved_mtl = mtl.state_dict()
    run(model, optimizer, mtl, range(CHECKPOINT_AFTER, spec["steps"]))
    straight = {n: _full(p) for n, p in model.named_parameters()}
    outcomes = {}
    for kind in ("resumed", "without_mtl_state"):
        fresh, fresh_optimizer, fresh_mtl = build()
        set_state_dict(
            fresh,
            fresh_optimizer,
            model_state_dict=copy.deepcopy(saved_model),
            optim_state_dict=copy.deepcopy(saved_optimizer),
        )
        if kind == "resumed":
            fresh_mtl.load_state_dict(saved_mtl)
        run(fresh, fresh_optimizer, fresh_mtl, range(CHECKPOINT_AFTER, spec["steps"]))
        outcomes[kind] = {n: _full(p) for n, p in fresh.named_parameters()}
    return {"params": straight, **outcomes}


def _skip_keeps_grad(rank: int, space: str) -> dict[str, Any]:
    """``on_nonfinite: skip`` with an infinite gradient on rank 0 only (a hook on z): both
    ranks skip, and every shard's ``.grad`` (accumulated before the call) is as it was."""
    x_all, y_all = data()
    model = _shard(Net().double())
    plugins = ["pcgrad"] if space == "params" else [STATIC]
    config = {"tasks": TASKS, "plugins": plugins, "space": space, "on_nonfinite": "skip"}
    mtl = MTL(config, shared=model.encoder, model=model)
    rows = slice(rank * 8, rank * 8 + 8)
    z, outputs = model(x_all[rows])
    mtl.backward(losses_of(outputs, {t: v[rows] for t, v in y_all.items()}))
    before = {n: _full(p.grad) for n, p in model.named_parameters()}
    z, outputs = model(x_all[rows])
    if rank == 0:
        z.register_hook(lambda grad: grad * float("inf"))
    report = mtl.backward(losses_of(outputs, {t: v[rows] for t, v in y_all.items()}))
    after = {n: _full(p.grad) for n, p in model.named_parameters()}
    return {
        "skipped": report.skipped,
        "unchanged": all(torch.equal(before[n], after[n]) for n in before),
    }


def _failure(rank: int) -> dict[str, Any]:
    """Rank 0 passes a wrong task name in space params: every rank raises, at once."""
    x_all, y_all = data()
    model = _shard(Net().double())
    config = {"tasks": TASKS, "plugins": ["pcgrad"], "space": "params"}
    mtl = MTL(config, shared=model.encoder, model=model)
    _z, outputs = model(x_all[rank * 8 : rank * 8 + 8])
    losses = losses_of(outputs, {t: v[rank * 8 : rank * 8 + 8] for t, v in y_all.items()})
    if rank == 0:
        losses = {"t9" if t == "t0" else t: v for t, v in losses.items()}
    try:
        mtl.backward(losses)
    except Exception as error:
        return {"error": type(error).__name__, "message": str(error), "at": time.time()}
    return {"error": None}


def _host_syncs(rank: int) -> dict[str, int]:
    """Host syncs of one call per space on the sharded model (mtlhooks.hostsync's budget)."""
    from mtlhooks import hostsync

    x_all, y_all = data()
    counts = {}
    for space, plugins in (("params", ["pcgrad"]), ("features", ["mgda"]), ("none", [STATIC])):
        model = _shard(Net().double())
        mtl = MTL(
            {"tasks": TASKS, "plugins": plugins, "space": space}, shared=model.encoder, model=model
        )
        rows = slice(rank * 8, rank * 8 + 8)
        z, outputs = model(x_all[rows])
        losses = losses_of(outputs, {t: v[rows] for t, v in y_all.items()})
        with hostsync.counting() as syncs:
            mtl.backward(losses, features=z)
        counts[space] = syncs[0]
    return counts


def _foreign_leaf(rank: int) -> dict[str, Any]:
    """A tensor outside the sharded model that rank 0's losses reach (FSDP would not reduce its
    gradient): rank 0 refuses it before any collective and rank 1 stops too, .grad untouched."""
    x_all, y_all = data()
    model = _shard(Net().double())
    config = {"tasks": TASKS, "plugins": ["pcgrad"], "space": "params"}
    mtl = MTL(config, shared=model.encoder, model=model)
    outside = torch.ones((), dtype=torch.float64, requires_grad=True)
    rows = slice(rank * 8, rank * 8 + 8)
    _z, outputs = model(x_all[rows])
    losses = losses_of(outputs, {t: v[rows] for t, v in y_all.items()})
    if rank == 0:
        losses["t1"] = losses["t1"] * outside
    try:
        mtl.backward(losses)
    except (InputError, DistributedError) as error:
        grads = [p.grad for p in model.parameters()] + [outside.grad]
        untouched = all(g is None for g in grads)
        return {"error": type(error).__name__, "message": str(error), "untouched": untouched}
    return {"error": None}


def _refusals() -> dict[str, str | None]:
    """What the pipeline refuses on a sharded model, each with the error's message."""
    model = _shard(Net().double())
    cases: dict[str, Callable[[], Any]] = {
        "no_model": lambda: MTL({"tasks": TASKS, "plugins": ["pcgrad"]}, shared=model.encoder),
        "sync_gramian": lambda: MTL(
            {"tasks": TASKS, "plugins": ["pcgrad"], "space": "params", "sync": "gramian"},
            shared=model.encoder,
            model=model,
        ),
        "layerwise": lambda: MTL(
            {"tasks": TASKS, "plugins": ["pcgrad"], "params_gramian": "layerwise"},
            shared=model.encoder,
            model=model,
        ),
        "last_shared_parameters": lambda: MTL(
            {"tasks": TASKS, "plugins": ["avgnorm"], "space": "last_shared"},
            shared=model.encoder,
            last_shared=list(model.encoder[2].parameters()),
            model=model,
        ),
    }
    out: dict[str, str | None] = {}
    for name, build in cases.items():
        try:
            build()
            out[name] = None
        except ConfigError as error:
            out[name] = str(error)
    return out


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group("gloo")
    results: dict[str, Any] = {}
    for name, scenario in SCENARIOS.items():
        if scenario["accelerate"]:
            results[name] = train_accelerate(scenario, rank, world)
        else:
            results[name] = train(scenario, rank, world)
    results["checkpoint"] = train_checkpointed(rank, world)
    for space in ("params", "none"):
        results[f"skip_{space}"] = _skip_keeps_grad(rank, space)
    results["failure"] = _failure(rank)
    results["refusals"] = _refusals()
    results["host_syncs"] = _host_syncs(rank)
    results["foreign_leaf"] = _foreign_leaf(rank)
    torch.save(results, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], list[Any]]:
    pytest.importorskip("accelerate")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6")
    out = tmp_path_factory.mktemp("fsdp")
    launch([sys.executable, str(Path(__file__).resolve()), str(out)])
    loaded = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return lambda name: [ranks[name] for ranks in loaded]


# -- comparisons --------------------------------------------------------------------------------

DELTAS: dict[str, float] = {}


def _max_delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


def _assert_exact(name: str, got: list[dict[str, Any]], want: dict[str, Any], tol: float) -> None:
    for other in got[1:]:
        for key, value in other["params"].items():
            assert torch.equal(got[0]["params"][key], value), f"ranks differ in {key}"
    DELTAS[name] = _max_delta(got[0]["params"], want["params"])
    print(f"{name}: max |Δ params| vs one process on the global batch = {DELTAS[name]:.3g}")
    for step, (mine, theirs) in enumerate(zip(got[0]["reports"], want["reports"])):
        for key in ("gramian", "weights"):
            if theirs[key] is None:
                assert mine[key] is None, f"{key} at step {step}"
            else:
                torch.testing.assert_close(
                    mine[key], theirs[key], rtol=tol, atol=tol, msg=f"{key} at step {step}"
                )
    for key, value in got[0]["params"].items():
        torch.testing.assert_close(value, want["params"][key], rtol=tol, atol=tol)
    initial = {n: p.detach() for n, p in Net().double().named_parameters()}
    assert _max_delta(want["params"], initial) > 1e-3  # the run moved: not an empty check


@pytest.mark.distributed
@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "params_mixed_precision"])
def test_fsdp2_matches_one_process_on_the_global_batch(results, name: str) -> None:
    """Every Gramian aggregator and norm balancer in space params; accumulation; fast-path
    calls in between; the heads' task_specific modes; uneven shards; a pipeline built before
    fully_shard; spaces features, last_shared and none; and Accelerate's FSDP2 plugin. Final
    parameters, each step's Gramian and weights equal the single process, ranks identical."""
    got = results(name)
    _assert_exact(name, got, reference(SCENARIOS[name]), tol=1e-10)
    if name.startswith("acc_"):
        assert all(r["sharded"] and "FSDP" in r["distributed_type"] for r in got)
    elif name.startswith("params_"):
        assert not got[0]["needs_no_sync"]


@pytest.mark.distributed
def test_fsdp2_mixed_precision_policy(results) -> None:
    """``MixedPrecisionPolicy(param_dtype=float32, reduce_dtype=float64)`` on float64
    parameters: equal to one process computing in float32, to float32 precision."""
    name = "params_mixed_precision"
    _assert_exact(name, results(name), reference(SCENARIOS[name]), tol=1e-5)


@pytest.mark.distributed
def test_fsdp2_resume_is_bit_identical(results) -> None:
    """``get_state_dict``/``set_state_dict`` (model, optimizer with momentum) and
    ``mtl.state_dict()`` after 2 of 5 steps: the resumed run ends bit-identical; without the
    pipeline's state (DWA, AvgNorm's averages) it does not. Equal to one process too."""
    for outcome in results("checkpoint"):
        straight = outcome["params"]
        assert all(torch.equal(straight[n], outcome["resumed"][n]) for n in straight)
        assert _max_delta(straight, outcome["without_mtl_state"]) > 1e-9
    got = results("checkpoint")[0]["params"]
    want = reference(CHECKPOINT)["params"]
    DELTAS["checkpoint"] = _max_delta(got, want)
    print(f"checkpoint: max |Δ params| vs one process = {DELTAS['checkpoint']:.3g}")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.distributed
@pytest.mark.parametrize("space", ["params", "none"])
def test_fsdp2_skip_on_one_rank_leaves_every_shard_as_it_was(results, space: str) -> None:
    for outcome in results(f"skip_{space}"):
        assert outcome["skipped"] and outcome["unchanged"]


@pytest.mark.distributed
def test_fsdp2_an_error_on_one_rank_stops_every_rank(results) -> None:
    failed, peer = results("failure")
    assert failed["error"] == "InputError"
    assert peer["error"] == "DistributedError" and "rank(s) [0]" in peer["message"]
    assert peer["at"] - failed["at"] < 10.0


@pytest.mark.distributed
def test_fsdp2_refusals_name_the_alternative(results) -> None:
    refusals = results("refusals")[0]
    assert refusals["no_model"] is not None and "model=model" in refusals["no_model"]
    declared = support.lookup(support.Engine.FSDP2, "params, sync: gramian").reason
    assert refusals["sync_gramian"] is not None and declared in refusals["sync_gramian"]
    assert refusals["layerwise"] is not None and "materialize" in refusals["layerwise"]
    message = refusals["last_shared_parameters"]
    assert message is not None and "as a module" in message


@pytest.mark.distributed
def test_fsdp2_a_tensor_outside_the_sharded_model_is_refused(results) -> None:
    failed, peer = results("foreign_leaf")
    assert failed["error"] == "InputError" and "outside the FSDP-sharded" in failed["message"]
    assert peer["error"] == "DistributedError"
    assert failed["untouched"] and peer["untouched"]


@pytest.mark.distributed
def test_fsdp2_host_syncs(results) -> None:
    """Per call on 2 ranks: the ranks' status, the Gramian with the losses and weights, the
    finiteness of the written shards (spaces with per-task gradients); the status and the
    finiteness on the fast path."""
    for counts in results("host_syncs"):
        assert counts == {"params": 3, "features": 3, "none": 2}


@pytest.mark.distributed
def test_fsdp_example_runs_under_torchrun(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 examples/fsdp_train.py`` (small, 2 micro-steps): it trains
    in space params on the sharded model, saves a checkpoint, and resumes from it."""
    import subprocess

    base = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        str(ROOT / "examples" / "fsdp_train.py"),
        *("--log-every", "2", "--batch-size", "8", "--n-train", "128"),
        *("--in-dim", "8", "--out-dim", "2", "--hidden", "16", "--output-dir", str(tmp_path)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in (["--steps", "4", "--accumulation", "2"], ["--steps", "2", "--resume"]):
        done = subprocess.run(
            [*base, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        assert "gradient space: params" in output and "each holds" in output, output
        assert "test error / σ per task" in output
    assert (tmp_path / "checkpoint" / "mtl.pt").is_file()


def test_gramian_methods_cover_the_registry() -> None:
    """The FSDP2 scenarios run every Gramian method of space params (none left out)."""
    methods = _gramian_methods()
    assert {"pcgrad", "mgda", "upgrad", "cagrad", "nash_mtl", "avgnorm", "gradnorm"} <= set(methods)


if __name__ == "__main__":
    from worker_exit import run_worker

    run_worker(_worker, Path(sys.argv[1]))
