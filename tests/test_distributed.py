"""Two CPU processes (gloo) against one process on the full batch.

Each suite starts two worker processes once (this file run as a script, with the environment
torchrun would set, on a free port); every worker runs all scenarios of its suite and saves, per
scenario and rank, the final parameters and what each optimizer step's report said. The tests
then compare with a single-process run of the same scenario here, on the global batch:

- ``ddp`` suite: plain ``torch.distributed`` + ``DistributedDataParallel`` through
  :mod:`mtlhooks.integrations.ddp`;
- ``accelerate`` suite: ``Accelerator(cpu=True)`` through
  :mod:`mtlhooks.integrations.accelerate`.

Data: optimizer step ``s`` uses the global batch ``x[s·B:(s+1)·B]``; with K micro-steps,
micro-step ``k`` takes rows ``[k·B/K, (k+1)·B/K)`` of it, and rank ``r`` the ``r``-th half of
those. The single-process reference takes the whole global batch at once.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mtlhooks import MTL, ConfigError, InputError, functional
from mtlhooks.integrations import ddp as mtl_ddp
from mtlhooks.problems import MultiTaskMLP, make_regression

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]
TASKS = ("t0", "t1", "t2")

# -- scenarios --------------------------------------------------------------------------------


def _spec(config: dict[str, Any], **options: Any) -> dict[str, Any]:
    spec = {
        "config": {"tasks": TASKS, "seed": 3, **config},
        "steps": 3,
        "batch": 16,  # global samples per optimizer step
        "accumulation": 1,
        "lr": 0.05,
        "momentum": 0.0,
        "amp": None,  # None | "fp16" | "bf16"
        "inject": None,  # optimizer step whose rank-0 gradients are made infinite
        "reference_micro_steps": False,  # the reference accumulates as the workers do
    }
    spec.update(options)
    return spec


STATIC = {"name": "static", "weights": {"t0": 1.0, "t1": 0.5, "t2": 2.0}}

DDP_SCENARIOS: dict[str, dict[str, Any]] = {
    "static": _spec({"plugins": [STATIC]}),
    "dwa": _spec({"plugins": [{"name": "dwa", "temperature": 0.5}]}, steps=4),
    "pcgrad_params": _spec({"plugins": ["pcgrad"], "space": "params"}),
    "mgda_features": _spec({"plugins": ["mgda"], "space": "features"}),
    "avgnorm_last_shared": _spec({"plugins": ["avgnorm"], "space": "last_shared"}),
    # An observer that wants gradients every other call: the calls in between take the fast
    # path (one weighted backward) while the forward ran under no_sync.
    "gradstats_every2_params": _spec(
        {"plugins": [STATIC, {"name": "gradstats", "every": 2}], "space": "params"}, steps=4
    ),
    "pcgrad_params_accumulate": _spec({"plugins": ["pcgrad"], "space": "params"}, accumulation=2),
    "mgda_params_gramian": _spec({"plugins": ["mgda"], "space": "params", "sync": "gramian"}),
    # plugins that read the per-task gradients themselves, with state across steps
    "moco_params": _spec({"plugins": ["moco"], "space": "params"}, steps=4),
    "excess_mtl_upgrad_params": _spec(
        {"plugins": [{"name": "excess_mtl", "step_size": 0.5}, "upgrad"], "space": "params"},
        steps=4,
    ),
    "fp16_pcgrad_params": _spec(
        {"plugins": ["pcgrad"], "space": "params"}, amp="fp16", inject=1, steps=3
    ),
}

ACCELERATE_SCENARIOS: dict[str, dict[str, Any]] = {
    "acc_pcgrad_params_accumulate": _spec(
        {"plugins": ["pcgrad", "gradstats"], "space": "params"}, accumulation=2
    ),
    "acc_avgnorm_mgda_last_shared": _spec(
        {"plugins": ["avgnorm", "mgda"], "space": "last_shared"}, steps=3
    ),
    "acc_mgda_features_accumulate": _spec(
        {"plugins": ["mgda"], "space": "features"},
        accumulation=2,
        reference_micro_steps=True,
    ),
    "acc_bf16_mgda_features": _spec(
        {"plugins": ["mgda"], "space": "features", "on_nonfinite": "skip"},
        amp="bf16",
        inject=1,
    ),
    "acc_checkpoint": _spec(
        {"plugins": [{"name": "dwa"}, {"name": "avgnorm", "ema": 0.5}, "pcgrad"]},
        steps=5,
        momentum=0.9,
    ),
}
CHECKPOINT_AFTER = 2  # acc_checkpoint saves after this many optimizer steps


class Net(MultiTaskMLP):
    """The problems' MLP with ``z`` in float32 at least: under mixed precision Accelerate
    returns a float32 copy of every half-precision output, and ``features=`` must be the tensor
    the heads consumed (``docs/distributed.md``)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.encoder(x)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        return z, {task: head(z) for task, head in self.heads.items()}


def problem(dtype: torch.dtype, net: type[MultiTaskMLP] = Net) -> tuple[Any, MultiTaskMLP]:
    data = make_regression(
        sigmas=(1.0, 3.0, 10.0), n_train=96, n_test=8, in_dim=6, out_dim=2, seed=0, dtype=dtype
    )
    model = net(6, 10, data.task_out_dims, depth=2, seed=1).to(dtype)
    return data, model


def shards(spec: dict[str, Any], step: int, rank: int, world: int, micro: int) -> Iterator[Any]:
    """(x, y) of each micro-step of optimizer step ``step`` on ``rank``."""
    data, _ = problem(_dtype(spec))
    batch = spec["batch"]
    x = data.x_train[step * batch : (step + 1) * batch]
    y = {t: data.y_train[t][step * batch : (step + 1) * batch] for t in TASKS}
    for k in range(micro):
        size = batch // micro
        part = slice(k * size + rank * size // world, k * size + (rank + 1) * size // world)
        yield x[part], {t: v[part] for t, v in y.items()}


def _dtype(spec: dict[str, Any]) -> torch.dtype:
    return torch.float64 if spec["amp"] is None else torch.float32


def _autocast(spec: dict[str, Any]) -> Any:
    if spec["amp"] is None:
        return nullcontext()
    dtype = torch.float16 if spec["amp"] == "fp16" else torch.bfloat16
    return torch.autocast("cpu", dtype=dtype)


def _inject(spec: dict[str, Any], step: int, rank: int, z: torch.Tensor) -> None:
    if spec["inject"] == step and rank == 0:
        z.register_hook(lambda grad: grad * float("inf"))


def _record(report: Any) -> dict[str, Any]:
    def copy_of(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.detach().double().clone()

    return {
        "losses": copy_of(report.losses),
        "weights": copy_of(report.weights),
        "gramian": copy_of(report.gramian),
        "skipped": report.skipped,
        "accumulating": report.accumulating,
    }


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# -- the training loops -------------------------------------------------------------------------


def train_plain(spec: dict[str, Any], rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Plain PyTorch (+ DDP when ``world`` > 1). ``world`` == 1 is the single-process reference
    on the global batch, which takes each optimizer step's batch at once unless the scenario's
    reference accumulates like the workers."""
    data, model = problem(_dtype(spec))
    distributed = world > 1
    micro = spec["accumulation"] if distributed or spec["reference_micro_steps"] else 1
    mtl = MTL(spec["config"], shared=model.encoder, communicator=None if distributed else False)
    net: torch.nn.Module = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(model)
        mtl_ddp.check(mtl, net)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=spec["momentum"])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if spec["amp"] == "fp16" else None
    reports, before_after, scales = [], [], []
    for step in range(spec["steps"]):
        before = _state(model)
        for k, (x, y) in enumerate(shards(spec, step, rank, max(world, 1), micro)):
            sync = k == micro - 1
            with mtl_ddp.forward_context(mtl, net, sync=sync), _autocast(spec):
                z, outputs = net(x)
                losses = data.losses(outputs, y)
            if spec["amp"] is not None:
                losses = {t: loss.float() for t, loss in losses.items()}
            _inject(spec, step, rank, z)
            report = mtl_ddp.backward(
                mtl,
                losses,
                features=z,
                sync=sync,
                accumulation_steps=micro,
                loss_scale=scaler,
            )
        reports.append(_record(report))
        if scaler is not None:
            scales.append(scaler.get_scale())
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()
        before_after.append((before, _state(model)))
    return {
        "params": _state(model),
        "reports": reports,
        "unchanged": [all(torch.equal(a[n], b[n]) for n in a) for a, b in before_after],
        "scales": scales,
        "divergence": mtl_ddp.parameter_divergence(model),
    }


def reference_gramian_mode(spec: dict[str, Any]) -> dict[str, Any]:
    """What ``sync: gramian`` with MGDA in space params computes on ``WORLD`` ranks, by hand:
    the weights come from the mean of the per-rank Gramians, the update is the gradient of the
    weighted global loss."""
    data, model = problem(_dtype(spec))
    optimizer = torch.optim.SGD(model.parameters(), lr=spec["lr"])
    shared = [p for p in model.encoder.parameters()]
    reports = []
    for step in range(spec["steps"]):
        gramians = []
        for rank in range(WORLD):
            ((x, y),) = shards(spec, step, rank, WORLD, 1)
            _, outputs = model(x)
            losses = data.losses(outputs, y)
            rows = []
            for t in TASKS:
                grads = torch.autograd.grad(losses[t], shared, retain_graph=True)
                rows.append(torch.cat([g.reshape(-1) for g in grads]))
            jacobian = torch.stack(rows)
            gramians.append(jacobian @ jacobian.T)
        gramian = sum(gramians) / WORLD
        weights = functional.mgda(gramian)
        ((x, y),) = shards(spec, step, 0, 1, 1)
        _, outputs = model(x)
        losses = data.losses(outputs, y)
        sum(w * losses[t] for w, t in zip(weights, TASKS)).backward()
        optimizer.step()
        optimizer.zero_grad()
        reports.append({"gramian": gramian.double(), "weights": weights.double()})
    return {"params": _state(model), "reports": reports}


def train_accelerate(
    spec: dict[str, Any], rank: int, world: int, *, checkpoint_dir: Path | None = None
) -> dict[str, Any]:
    """The Accelerate loop shape: prepare, ``mtl.accumulate(model)``, ``optimizer.step()``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.tracking import GeneralTracker

    from mtlhooks.integrations.accelerate import AcceleratedMTL

    class MemoryTracker(GeneralTracker):
        name = "memory"
        requires_logging_directory = False

        def __init__(self) -> None:
            super().__init__()
            self.logged: list[dict[str, Any]] = []

        @property
        def tracker(self) -> Any:
            return self.logged

        def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
            self.logged.append(dict(values))

    def build(start: int, *, model_seed_offset: int = 0, restore: str = "") -> dict[str, Any]:
        # One Accelerator per phase: the singletons keep the process group, not the settings.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        tracker = MemoryTracker()
        accelerator = Accelerator(
            cpu=True,
            gradient_accumulation_steps=spec["accumulation"],
            mixed_precision=spec["amp"] or "no",
            log_with=[tracker],
        )
        accelerator.init_trackers("mtl")
        data, model = problem(_dtype(spec))
        if model_seed_offset:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(model_seed_offset)
        mtl = AcceleratedMTL(
            accelerator, spec["config"], shared=model.encoder, checkpoint=restore != "fresh_mtl"
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=spec["lr"], momentum=spec["momentum"])
        net, optimizer = accelerator.prepare(model, optimizer)
        if restore:
            assert checkpoint_dir is not None
            source = checkpoint_dir
            if restore == "fresh_mtl":
                # Accelerate refuses a folder with more registered objects than registered now.
                source = checkpoint_dir.with_name(f"{checkpoint_dir.name}_without_mtl_{rank}")
                shutil.copytree(
                    checkpoint_dir, source, ignore=shutil.ignore_patterns("custom_checkpoint_*")
                )
            accelerator.load_state(str(source))
        reports, unchanged = [], []
        for step in range(start, spec["steps"]):
            before = _state(model)
            for x, y in shards(spec, step, rank, world, spec["accumulation"]):
                with mtl.accumulate(net):
                    z, outputs = net(x)
                    _inject(spec, step, rank, z)
                    report = mtl.backward(data.losses(outputs, y), features=z)
                    optimizer.step()
                    optimizer.zero_grad()
            reports.append(_record(report))
            unchanged.append(all(torch.equal(before[n], p) for n, p in _state(model).items()))
            if checkpoint_dir is not None and not restore and step + 1 == CHECKPOINT_AFTER:
                accelerator.save_state(str(checkpoint_dir))
        return {
            "params": _state(model),
            "reports": reports,
            "unchanged": unchanged,
            "divergence": mtl_ddp.parameter_divergence(model),
            "tracked": len([v for v in tracker.logged if any("gradstats" in k for k in v)]),
            "space": mtl.space.value,
            "needs_no_sync": mtl.needs_no_sync,
        }

    if checkpoint_dir is None:
        return build(0)
    straight = build(0)
    resumed = build(CHECKPOINT_AFTER, model_seed_offset=1, restore="all")
    without_mtl_state = build(CHECKPOINT_AFTER, model_seed_offset=1, restore="fresh_mtl")
    return {**straight, "resumed": resumed, "without_mtl_state": without_mtl_state}


# -- the worker processes -----------------------------------------------------------------------


def _worker(suite: str, out: Path) -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if suite == "ddp":
        torch.distributed.init_process_group("gloo")
        for name, spec in DDP_SCENARIOS.items():
            torch.save(train_plain(spec, rank, world), out / f"{name}.rank{rank}.pt")
    else:
        for name, spec in ACCELERATE_SCENARIOS.items():
            directory = out / "checkpoint" if name == "acc_checkpoint" else None
            result = train_accelerate(spec, rank, world, checkpoint_dir=directory)
            torch.save(result, out / f"{name}.rank{rank}.pt")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(command: list[str], *, timeout: float = 180.0) -> list[str]:
    """Start ``WORLD`` copies of ``command`` with the environment torchrun would give them."""
    port = free_port()
    processes = []
    for rank in range(WORLD):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            "LOCAL_WORLD_SIZE": str(WORLD),
            "OMP_NUM_THREADS": "1",
        }
        processes.append(
            subprocess.Popen(
                command,
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    failed = [rank for rank, p in enumerate(processes) if p.returncode != 0]
    assert not failed, "\n".join(f"--- rank {r} ---\n{outputs[r]}" for r in failed)
    return outputs


Loaded = Callable[[str], list[dict[str, Any]]]


def _run_suite(suite: str, out: Path) -> Loaded:
    launch([sys.executable, str(Path(__file__).resolve()), suite, str(out)])

    def load(name: str) -> list[dict[str, Any]]:
        return [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(WORLD)]

    return load


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    return _run_suite("ddp", tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def accelerate_results(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    pytest.importorskip("accelerate")
    return _run_suite("accelerate", tmp_path_factory.mktemp("accelerate"))


# -- comparisons --------------------------------------------------------------------------------

DELTAS: dict[str, float] = {}


def max_delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


def assert_ranks_identical(results: list[dict[str, Any]]) -> None:
    first = results[0]["params"]
    for other in results[1:]:
        for name, value in other["params"].items():
            assert torch.equal(first[name], value), f"ranks differ in {name}"
    assert all(r["divergence"] == 0.0 for r in results)


def assert_matches(
    name: str,
    results: list[dict[str, Any]],
    reference: dict[str, Any],
    *,
    rtol: float = 1e-9,
    atol: float = 1e-10,
) -> None:
    assert_ranks_identical(results)
    DELTAS[name] = max_delta(results[0]["params"], reference["params"])
    print(f"{name}: max |Δ params| vs single process = {DELTAS[name]:.3g}")
    for step, (got, want) in enumerate(zip(results[0]["reports"], reference["reports"])):
        for key in ("gramian", "weights"):
            if want[key] is None:
                assert got[key] is None
            else:
                torch.testing.assert_close(
                    got[key], want[key], rtol=rtol, atol=atol, msg=f"{key} at step {step}"
                )
    for key, value in results[0]["params"].items():
        torch.testing.assert_close(value, reference["params"][key], rtol=rtol, atol=atol)
    # The run must have moved away from the initial parameters, or the comparison is empty.
    _, initial = problem(results[0]["params"][next(iter(results[0]["params"]))].dtype)
    assert max_delta(_state(initial), reference["params"]) > 1e-3


# -- plain torch.distributed / DDP ----------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name",
    [
        "static",
        "dwa",
        "pcgrad_params",
        "mgda_features",
        "avgnorm_last_shared",
        "gradstats_every2_params",
        "pcgrad_params_accumulate",
        "moco_params",
        "excess_mtl_upgrad_params",
    ],
)
def test_ddp_matches_single_process_on_the_global_batch(ddp_results: Loaded, name: str) -> None:
    """Loss scaling (static; DWA, which reads loss values), an aggregator in params (PCGrad) and
    in features (MGDA) space, norm balancing in last_shared (AvgNorm), an observer that wants
    gradients only at some calls, and K=2 micro-steps against one batch twice as large: final
    parameters, every step's Gramian and weights equal the single-process run, and the ranks
    hold identical parameters."""
    assert_matches(name, ddp_results(name), train_plain(DDP_SCENARIOS[name]))


@pytest.mark.distributed
def test_ddp_params_gramian_sync_is_the_documented_approximation(ddp_results: Loaded) -> None:
    """``sync: gramian`` weights from the mean of the per-rank Gramians (not the Gramian of the
    global batch), then one DDP-synchronised weighted backward: equal to that computation by
    hand, and different from the exact mode."""
    name = "mgda_params_gramian"
    results = ddp_results(name)
    spec = DDP_SCENARIOS[name]
    assert_matches(name, results, reference_gramian_mode(spec))
    exact = train_plain({**spec, "config": {**spec["config"], "sync": "exact"}})
    DELTAS["gramian_vs_exact"] = max_delta(results[0]["params"], exact["params"])
    print(f"sync gramian vs exact: max |Δ params| = {DELTAS['gramian_vs_exact']:.3g}")
    assert DELTAS["gramian_vs_exact"] > 1e-8


@pytest.mark.distributed
def test_ddp_fp16_grad_scaler_skips_the_overflowing_step(ddp_results: Loaded) -> None:
    """CPU autocast float16 + ``GradScaler("cpu")``: infinite gradients on rank 0 at step 1
    make both ranks skip that step (parameters untouched, scale halved) and stay identical; the
    other steps follow the single-process run to fp16 precision."""
    name = "fp16_pcgrad_params"
    results = ddp_results(name)
    spec = DDP_SCENARIOS[name]
    assert_ranks_identical(results)
    for result in results:
        assert [r["skipped"] for r in result["reports"]] == [False, True, False]
        assert result["unchanged"] == [False, True, False]
        assert result["scales"][2] == result["scales"][1] / 2
    reference = train_plain(spec)
    DELTAS[name] = max_delta(results[0]["params"], reference["params"])
    print(f"{name}: max |Δ params| vs single process = {DELTAS[name]:.3g}")
    assert DELTAS[name] < 1e-3


# -- Accelerate ---------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["acc_pcgrad_params_accumulate", "acc_avgnorm_mgda_last_shared"])
def test_accelerate_matches_single_process(accelerate_results: Loaded, name: str) -> None:
    """``Accelerator(cpu=True)`` on 2 processes: PCGrad in params space with
    ``gradient_accumulation_steps=2`` equals one process on the batch twice as large; AvgNorm +
    MGDA in last_shared equals one process on the global batch."""
    results = accelerate_results(name)
    assert_matches(name, results, train_plain(ACCELERATE_SCENARIOS[name]))
    if name == "acc_pcgrad_params_accumulate":
        assert results[0]["needs_no_sync"]
        # gradstats records reach the accelerator's trackers (which live on the main process).
        assert results[0]["tracked"] > 0
        assert results[1]["tracked"] == 0


@pytest.mark.distributed
def test_accelerate_features_space_aggregates_every_micro_step(
    accelerate_results: Loaded,
) -> None:
    """Space features under accumulation: each micro-step is aggregated on its own (with the
    Gramian of that micro-step's global batch) and ``.grad`` accumulates: equal to one process
    doing the same micro-steps on the global micro-batches."""
    name = "acc_mgda_features_accumulate"
    assert_matches(name, accelerate_results(name), train_plain(ACCELERATE_SCENARIOS[name]))


@pytest.mark.distributed
def test_accelerate_bf16_skips_a_non_finite_step(accelerate_results: Loaded) -> None:
    """``mixed_precision="bf16"`` on CPU with ``on_nonfinite: skip``: infinite gradients on rank
    0 make both ranks skip that step with the parameters untouched; the run otherwise follows
    the single-process bf16 run to bf16 precision."""
    name = "acc_bf16_mgda_features"
    results = accelerate_results(name)
    assert_ranks_identical(results)
    for result in results:
        assert [r["skipped"] for r in result["reports"]] == [False, True, False]
        assert result["unchanged"] == [False, True, False]
    reference = train_plain(ACCELERATE_SCENARIOS[name])
    DELTAS[name] = max_delta(results[0]["params"], reference["params"])
    print(f"{name}: max |Δ params| vs single process = {DELTAS[name]:.3g}")
    assert DELTAS[name] < 1e-3


@pytest.mark.distributed
def test_accelerate_save_state_load_state_resumes_identically(
    accelerate_results: Loaded,
) -> None:
    """``accelerator.save_state`` after 2 of 5 steps, then ``load_state`` into a fresh model,
    optimizer and pipeline: the last 3 steps give bit-identical parameters. Without the
    pipeline's state (DWA history, AvgNorm's averages, the generator) they do not."""
    results = accelerate_results("acc_checkpoint")
    assert_ranks_identical(results)
    for result in results:
        straight, resumed = result["params"], result["resumed"]["params"]
        assert all(torch.equal(straight[n], resumed[n]) for n in straight)
        without = max_delta(straight, result["without_mtl_state"]["params"])
        print(f"acc_checkpoint: resumed without the pipeline's state: max |Δ| = {without:.3g}")
        assert without > 1e-9
    reference = train_plain(ACCELERATE_SCENARIOS["acc_checkpoint"])
    DELTAS["acc_checkpoint"] = max_delta(results[0]["params"], reference["params"])
    print(f"acc_checkpoint: max |Δ params| vs single process = {DELTAS['acc_checkpoint']:.3g}")
    torch.testing.assert_close(results[0]["params"], reference["params"], rtol=1e-9, atol=1e-10)


# -- the example --------------------------------------------------------------------------------


@pytest.mark.distributed
def test_example_runs_under_torchrun(tmp_path: Path) -> None:
    """``torchrun --standalone --nproc_per_node 2 examples/accelerate_train.py`` (small): it
    trains, saves its state, and both processes end with the same weights."""
    pytest.importorskip("accelerate")
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        str(ROOT / "examples" / "accelerate_train.py"),
        *("--steps", "4", "--log-every", "2", "--accumulation", "2", "--batch-size", "8"),
        *("--n-train", "128", "--in-dim", "8", "--out-dim", "2", "--hidden", "16"),
        *("--output-dir", str(tmp_path / "run")),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "gradient space: params" in output
    assert "step     4" in output
    assert "replicas identical: True" in output, output
    assert (tmp_path / "run" / "checkpoint" / "custom_checkpoint_0.pkl").is_file()


# -- single-process checks of the integrations ----------------------------------------------------


def _stub_accelerator(kind: Any, processes: int = 1) -> Any:
    return SimpleNamespace(
        distributed_type=kind,
        num_processes=processes,
        device=torch.device("cpu"),
        register_for_checkpointing=lambda *objects: None,
        register_save_state_pre_hook=lambda hook: None,
    )


def test_deepspeed_refuses_space_params_with_a_clear_error() -> None:
    """DeepSpeed: space params is refused (naming the alternatives); loss-level plugins run
    (tests/test_deepspeed.py runs them, and surgery in features and last_shared)."""
    pytest.importorskip("accelerate")
    from accelerate.utils import DistributedType

    from mtlhooks.integrations.accelerate import AcceleratedMTL

    _, model = problem(torch.float64)
    deepspeed = _stub_accelerator(DistributedType.DEEPSPEED)
    with pytest.raises(ConfigError, match=r"DeepSpeed.*FSDP2"):
        AcceleratedMTL(deepspeed, {"tasks": TASKS, "plugins": ["pcgrad"]}, shared=model.encoder)
    AcceleratedMTL(deepspeed, {"tasks": TASKS, "plugins": [STATIC]})


def test_fsdp1_is_refused_for_gradient_plugins_and_fsdp2_needs_the_model() -> None:
    """FSDP1 (flat parameters) only with loss-level plugins; FSDP2 with every plugin, given
    model= (tests/test_fsdp.py runs it)."""
    pytest.importorskip("accelerate")
    from accelerate.utils import DistributedType

    from mtlhooks.integrations.accelerate import AcceleratedMTL

    _, model = problem(torch.float64)
    fsdp1 = _stub_accelerator(DistributedType.FSDP)
    with pytest.raises(ConfigError, match=r"FSDP1.*pcgrad.*fsdp_version=2"):
        AcceleratedMTL(fsdp1, {"tasks": TASKS, "plugins": ["pcgrad"]}, shared=model.encoder)
    AcceleratedMTL(fsdp1, {"tasks": TASKS, "plugins": [STATIC]})
    fsdp2 = _stub_accelerator(DistributedType.FSDP)
    fsdp2.state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2))
    config = {"tasks": TASKS, "plugins": ["pcgrad"]}
    with pytest.raises(ConfigError, match="model=model"):
        AcceleratedMTL(fsdp2, config, shared=model.encoder)
    AcceleratedMTL(fsdp2, config, shared=model.encoder, model=model)


def test_an_mtl_without_communicator_is_refused_on_several_processes() -> None:
    pytest.importorskip("accelerate")
    from accelerate.utils import DistributedType

    from mtlhooks.integrations.accelerate import AcceleratedMTL

    _, model = problem(torch.float64)
    mtl = MTL({"tasks": TASKS, "plugins": ["pcgrad"]}, shared=model.encoder)
    with pytest.raises(InputError, match="communicator"):
        AcceleratedMTL(_stub_accelerator(DistributedType.MULTI_CPU, processes=2), mtl)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_single_process_accelerate_accumulation_equals_one_big_batch() -> None:
    """One process, ``gradient_accumulation_steps=2``: the integration divides the losses and
    passes ``sync_gradients`` so that PCGrad sees the accumulated gradients once."""
    pytest.importorskip("accelerate")
    spec = ACCELERATE_SCENARIOS["acc_pcgrad_params_accumulate"]
    single = train_accelerate(spec, 0, 1)
    reference = train_plain(spec)
    for key, value in single["params"].items():
        torch.testing.assert_close(value, reference["params"][key], rtol=1e-9, atol=1e-10)
    assert [r["accumulating"] for r in single["reports"]] == [False] * spec["steps"]


class FakeDDP(torch.nn.parallel.DistributedDataParallel):
    """Passes ``isinstance(·, DistributedDataParallel)`` and records ``no_sync()``, without a
    process group."""

    def __init__(self, static_graph: bool = False) -> None:
        torch.nn.Module.__init__(self)
        self.static_graph = static_graph
        self.entered: list[bool] = []

    def no_sync(self) -> Any:
        self.entered.append(True)
        return nullcontext()


def test_forward_context_enters_no_sync_only_when_needed() -> None:
    _, model = problem(torch.float64)
    fake = FakeDDP()
    entered = fake.entered
    exact = MTL({"tasks": TASKS, "plugins": ["pcgrad"], "space": "params"}, shared=model.encoder)
    features = MTL({"tasks": TASKS, "plugins": ["mgda"], "space": "features"})
    cases = [(exact, True, 1), (exact, False, 1), (features, True, 0), (features, False, 1)]
    for mtl, sync, expected in cases:
        entered.clear()
        with mtl_ddp.forward_context(mtl, fake, copy.deepcopy(model), sync=sync):
            pass
        assert len(entered) == expected, (mtl.space, sync)


def test_backward_divides_by_the_accumulation_steps() -> None:
    _, model = problem(torch.float64)
    mtl = MTL({"tasks": TASKS, "plugins": [STATIC]})
    data, _ = problem(torch.float64)
    _, outputs = model(data.x_train[:4])
    losses = data.losses(outputs, {t: data.y_train[t][:4] for t in TASKS})
    report = mtl_ddp.backward(mtl, losses, accumulation_steps=4)
    expected = torch.stack([losses[t].detach() for t in TASKS]) / 4
    torch.testing.assert_close(report.losses, expected)
    with pytest.raises(InputError, match="accumulation_steps"):
        mtl_ddp.backward(mtl, losses, accumulation_steps=0)


if __name__ == "__main__":
    from worker_exit import run_worker

    run_worker(_worker, sys.argv[1], Path(sys.argv[2]))


def test_static_graph_ddp_is_refused_with_per_task_gradients() -> None:
    _, model = problem(torch.float64)
    exact = MTL({"tasks": TASKS, "plugins": ["pcgrad"], "space": "params"}, shared=model.encoder)
    with pytest.raises(InputError, match="static_graph"):
        mtl_ddp.check(exact, FakeDDP(static_graph=True))
    mtl_ddp.check(MTL({"tasks": TASKS, "plugins": [STATIC]}), FakeDDP(static_graph=True))
    mtl_ddp.check(exact, FakeDDP())


def test_accelerated_no_sync_follows_needs_no_sync() -> None:
    """``AcceleratedMTL.no_sync`` (and so ``accumulate``) enters ``accelerator.no_sync`` for
    space params with sync: exact, whatever the accumulation step; not for features."""
    pytest.importorskip("accelerate")
    from accelerate.utils import DistributedType

    from mtlhooks.integrations.accelerate import AcceleratedMTL

    entered: list[Any] = []

    def no_sync(model: Any) -> Any:
        entered.append(model)
        return nullcontext()

    stub = _stub_accelerator(DistributedType.NO)
    stub.no_sync = no_sync
    _, model = problem(torch.float64)
    for plugins, space, expected in [(["pcgrad"], "params", 1), (["mgda"], "features", 0)]:
        entered.clear()
        config = {"tasks": TASKS, "plugins": plugins, "space": space}
        mtl = AcceleratedMTL(stub, config, shared=model.encoder)
        with mtl.no_sync(model):
            pass
        assert len(entered) == expected


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_features_copied_by_accelerate_mixed_precision_get_a_clear_error() -> None:
    """Under mixed precision Accelerate returns float32 copies of half-precision outputs; a
    ``z`` copied that way is not upstream of the losses, and the error says what to change."""
    from accelerate import Accelerator

    from mtlhooks.integrations.accelerate import AcceleratedMTL

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    data, model = problem(torch.float32, net=MultiTaskMLP)  # returns z as computed: bf16
    mtl = AcceleratedMTL(accelerator, {"tasks": TASKS, "plugins": ["mgda"], "space": "features"})
    net = accelerator.prepare(model)
    z, outputs = net(data.x_train[:8])
    assert z.dtype == torch.float32
    with pytest.raises(InputError, match=r"z = self.encoder\(x\).float\(\)"):
        mtl.backward(data.losses(outputs, {t: data.y_train[t][:8] for t in TASKS}), features=z)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_save_state_in_the_middle_of_a_window_writes_nothing(tmp_path: Path) -> None:
    """``accelerator.save_state`` between the micro-steps of space params is refused before
    Accelerate writes the model, optimizer or RNG files (it used to write them, then fail)."""
    from accelerate import Accelerator

    from mtlhooks.integrations.accelerate import AcceleratedMTL

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    data, model = problem(torch.float64)
    config = {"tasks": TASKS, "plugins": ["pcgrad"], "space": "params"}
    mtl = AcceleratedMTL(accelerator, config, shared=model.encoder)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    net, optimizer = accelerator.prepare(model, optimizer)
    x, y = data.x_train[:4], {t: v[:4] for t, v in data.y_train.items()}
    with mtl.accumulate(net):
        _, outputs = net(x)
        assert mtl.backward(data.losses(outputs, y)).accumulating
    target = tmp_path / "checkpoint"
    with pytest.raises(InputError, match="nothing was written"):
        accelerator.save_state(str(target))
    assert not target.exists() or not any(target.iterdir())
    with mtl.accumulate(net):
        _, outputs = net(x)
        mtl.backward(data.losses(outputs, y))
        optimizer.step()
        optimizer.zero_grad()
    accelerator.save_state(str(target))
    assert any(target.iterdir())


def test_a_skipped_synchronising_micro_step_ends_the_accumulation_window() -> None:
    """Space params with ``on_nonfinite: skip``: a non-finite loss at the micro-step that
    synchronises skips the optimizer step; the micro-steps before it must not leak into the next
    window (and ``state_dict`` works again)."""
    data, model = problem(torch.float64)
    config = {"tasks": TASKS, "plugins": ["pcgrad"], "space": "params", "on_nonfinite": "skip"}

    def halves(net: torch.nn.Module, rows: slice) -> dict[str, torch.Tensor]:
        _, outputs = net(data.x_train[rows])
        targets = {t: data.y_train[t][rows] for t in TASKS}
        return {t: loss / 2 for t, loss in data.losses(outputs, targets).items()}

    mtl = MTL(config, shared=model.encoder)
    mtl.backward(halves(model, slice(0, 4)), sync=False)
    poisoned = halves(model, slice(4, 8))
    poisoned["t0"] = poisoned["t0"] * float("inf")
    assert mtl.backward(poisoned, sync=True).skipped
    mtl.state_dict()
    mtl.backward(halves(model, slice(8, 12)), sync=False)
    mtl.backward(halves(model, slice(12, 16)), sync=True)

    clean = copy.deepcopy(model)
    for p in clean.parameters():
        p.grad = None
    fresh = MTL(config, shared=clean.encoder)
    fresh.backward(halves(clean, slice(8, 12)), sync=False)
    fresh.backward(halves(clean, slice(12, 16)), sync=True)
    for (name, p), q in zip(model.named_parameters(), clean.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
