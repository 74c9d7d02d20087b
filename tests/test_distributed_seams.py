"""Data parallelism at its seams, 2 gloo processes against one process on the global batch:
accumulation windows that mix calls, heads that only some ranks reach, DDP's unused-parameter
sink, uneven shards, heads weighted apart from the trunk; and the ranks agreeing or failing
together (a different pipeline on one rank, an error on one rank).

The worker (this file run as a script on 2 ranks) runs every scenario once and saves what each
rank ended with; the tests compare it with a single-process run here.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mtlhooks import MTL, ConfigError, InputError
from mtlhooks.integrations import ddp as mtl_ddp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import WORLD, launch

TASKS = ("t0", "t1", "t2")
STATIC = {"name": "static", "weights": {"t0": 1.0, "t1": 0.5, "t2": 2.0}}


class Net(nn.Module):
    """A tanh trunk and one linear head per task; with ``routed``, task t2's head is two
    sub-heads and each sample goes through one of them (by the sign of its first feature), so
    a rank whose samples all go one way never reaches the other sub-head."""

    def __init__(self, routed: bool = False) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.encoder = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(8, 2) for t in TASKS})
        self.routed = routed
        self.other = nn.Linear(8, 2) if routed else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.encoder(x)
        outputs = {t: head(z) for t, head in self.heads.items()}
        if self.routed:
            assert self.other is not None
            mask = x[:, 0] < 0
            routed = outputs["t2"].clone()
            if bool(mask.any()):
                routed = routed.index_put((mask.nonzero()[:, 0],), self.other(z[mask]))
            outputs["t2"] = routed
        return z, outputs


def data(total: int = 96) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(total, 6, generator=generator, dtype=torch.float64)
    # Step 0's second half (rank 1's shard) has only positive first features: no routing.
    x[8:16, 0] = x[8:16, 0].abs() + 0.1
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
        "routed": False,
        "model_arg": False,  # pass model= to MTL
        "find_unused": False,
        "split": None,  # rows of rank 0 in each (micro-)batch, None: half
        "batch_size_arg": False,  # pass batch_size= to backward
    }
    out.update(options)
    return out


SCENARIOS: dict[str, dict[str, Any]] = {
    # 3. a loss-dependent weighting and an observer every 3rd call, K=2: the observer wants
    # per-task gradients in the middle of some windows
    "window_uwso_gradstats": spec(
        {"plugins": [{"name": "uw_so"}, {"name": "gradstats", "every": 3}], "space": "params"},
        accumulation=2,
        steps=4,
    ),
    "window_dwa_alone": spec(
        {"plugins": [{"name": "dwa", "temperature": 0.5}], "space": "params"},
        accumulation=2,
        steps=4,
    ),
    # 4. a sub-head rank 1 does not reach at step 0
    "routed_with_model": spec(
        {"plugins": ["pcgrad"], "space": "params"}, routed=True, model_arg=True
    ),
    # 5. DDP(find_unused_parameters=True) in space features
    "find_unused_features": spec({"plugins": ["mgda"], "space": "features"}, find_unused=True),
    # 6. uneven shards: 10 and 6 samples of 16
    "uneven_static": spec({"plugins": [STATIC]}, split=10, batch_size_arg=True),
    "uneven_mgda_features": spec(
        {"plugins": ["mgda"], "space": "features"}, split=10, batch_size_arg=True
    ),
    "uneven_pcgrad_params": spec(
        {"plugins": ["pcgrad"], "space": "params"}, split=10, batch_size_arg=True
    ),
    # task_specific under data parallelism
    "unweighted_heads_features": spec(
        {"plugins": [STATIC, "mgda"], "space": "features", "task_specific": "unweighted"}
    ),
    "unweighted_heads_params": spec(
        {"plugins": [STATIC, "mgda"], "space": "params", "task_specific": "unweighted"}
    ),
}
UNEVEN_WITHOUT_BATCH_SIZE = spec({"plugins": [STATIC]}, split=10)


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


def train(spec: dict[str, Any], rank: int = 0, world: int = 1) -> dict[str, Any]:
    x_all, y_all = data()
    model = Net(spec["routed"]).double()
    distributed = world > 1
    micro = spec["accumulation"] if distributed else 1
    net: nn.Module = model
    mtl = MTL(
        spec["config"],
        shared=model.encoder,
        model=model if spec["model_arg"] else None,
        communicator=None if distributed else False,
    )
    if distributed:
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=spec["find_unused"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    reports = []
    for step in range(spec["steps"]):
        for k, rows in enumerate(_rows(spec, step, rank, world, micro)):
            sync = k == micro - 1
            x, y = x_all[rows], {t: v[rows] for t, v in y_all.items()}
            with mtl_ddp.forward_context(mtl, net, sync=sync):
                z, outputs = net(x)
            report = mtl_ddp.backward(
                mtl,
                losses_of(outputs, y),
                features=z,
                sync=sync,
                accumulation_steps=micro,
                **({"batch_size": len(x)} if spec["batch_size_arg"] and distributed else {}),
            )
        reports.append(None if report.weights is None else report.weights.clone())
        optimizer.step()
        optimizer.zero_grad()
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "weights": reports,
        "divergence": mtl_ddp.parameter_divergence(model),
    }


# -- failures ---------------------------------------------------------------------------------


def _failure(kind: str, rank: int) -> dict[str, Any]:
    """Rank 0 fails in its second call; what each rank raised and when."""
    configs = {
        "fast": {"plugins": [STATIC]},
        "features": {"plugins": ["mgda"], "space": "features"},
        "params": {"plugins": ["pcgrad"], "space": "params"},
        "micro": {"plugins": ["pcgrad"], "space": "params"},
        "nan_raise": {"plugins": ["mgda"], "space": "features"},
    }
    x_all, y_all = data()
    model = Net().double()
    mtl = MTL({"tasks": TASKS, **configs[kind]}, shared=model.encoder)
    net = nn.parallel.DistributedDataParallel(model)
    outcome: dict[str, Any] = {"error": None}
    for call in range(2):
        rows = slice(call * 16 + rank * 8, call * 16 + rank * 8 + 8)
        with mtl_ddp.forward_context(mtl, net, sync=kind != "micro"):
            z, outputs = net(x_all[rows])
        losses = losses_of(outputs, {t: v[rows] for t, v in y_all.items()})
        if call == 1 and rank == 0:
            if kind == "nan_raise":
                losses["t1"] = losses["t1"] * float("nan")
            else:
                losses = {"t9" if t == "t0" else t: v for t, v in losses.items()}
        start = time.time()
        try:
            mtl.backward(losses, features=z, sync=kind != "micro")
        except Exception as error:
            outcome = {
                "error": type(error).__name__,
                "message": str(error),
                "at": time.time(),
                "after": time.time() - start,
            }
            break
    torch.distributed.barrier()
    return outcome


def _drift(rank: int) -> dict[str, Any]:
    model = Net().double()
    seed = 3 + rank
    try:
        MTL({"tasks": TASKS, "seed": seed, "plugins": ["pcgrad"]}, shared=model.encoder)
    except ConfigError as error:
        return {"error": "ConfigError", "message": str(error)}
    return {"error": None}


def _layerwise_refused() -> dict[str, Any]:
    model = Net().double()
    try:
        MTL(
            {
                "tasks": TASKS,
                "plugins": ["pcgrad"],
                "space": "params",
                "params_gramian": "layerwise",
            },
            shared=model.encoder,
        )
    except ConfigError as error:
        return {"error": "ConfigError", "message": str(error)}
    return {"error": None}


def _routed_without_model(rank: int) -> dict[str, Any]:
    try:
        train(spec({"plugins": ["pcgrad"], "space": "params"}, routed=True), rank, WORLD)
    except InputError as error:
        return {"error": "InputError", "message": str(error)}
    return {"error": None}


def _logging(rank: int, out: Path) -> dict[str, Any]:
    """gradstats under DDP with a JSONL and a CSV on one path for every rank (rank 0 writes),
    then with ``ranks: all`` (each rank its own files)."""
    x_all, y_all = data()
    for ranks in ("main", "all"):
        model = Net().double()
        net = nn.parallel.DistributedDataParallel(model)
        logging = {
            "every": 1,
            "jsonl": str(out / f"{ranks}.jsonl"),
            "csv": str(out / f"{ranks}.csv"),
        }
        config = {
            "tasks": TASKS,
            "plugins": ["mgda", {"name": "gradstats", "ranks": ranks, **logging}],
            "space": "features",
        }
        with MTL(config, shared=model.encoder) as mtl:
            for step in range(4):
                rows = slice(step * 16 + rank * 8, step * 16 + rank * 8 + 8)
                z, outputs = net(x_all[rows])
                mtl.backward(losses_of(outputs, {t: v[rows] for t, v in y_all.items()}), features=z)
    return {}


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.distributed.init_process_group("gloo")
    results: dict[str, Any] = {}
    for name, scenario in SCENARIOS.items():
        results[name] = train(scenario, rank, world)
    results["uneven_without_batch_size"] = train(UNEVEN_WITHOUT_BATCH_SIZE, rank, world)
    results["routed_without_model"] = _routed_without_model(rank)
    results["drift"] = _drift(rank)
    results["layerwise"] = _layerwise_refused()
    results["logging"] = _logging(rank, out)
    for kind in ("fast", "features", "params", "micro", "nan_raise"):
        results[f"failure_{kind}"] = _failure(kind, rank)
    torch.save(results, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def worker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seams")
    launch([sys.executable, str(Path(__file__).resolve()), str(out)])
    return out


@pytest.fixture(scope="module")
def results(worker_dir: Path) -> Callable[[str], list[Any]]:
    loaded = [torch.load(worker_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return lambda name: [ranks[name] for ranks in loaded]


def _max_delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _assert_exact(
    name: str, got: list[dict[str, Any]], reference: dict[str, Any], routed: bool
) -> None:
    for other in got[1:]:
        for key, value in other["params"].items():
            assert torch.equal(got[0]["params"][key], value), f"ranks differ in {key}"
    delta = _max_delta(got[0]["params"], reference["params"])
    print(f"{name}: max |Δ params| vs one process on the global batch = {delta:.3g}")
    for key, value in got[0]["params"].items():
        torch.testing.assert_close(value, reference["params"][key], rtol=1e-10, atol=1e-12)
    for mine, theirs in zip(got[0]["weights"], reference["weights"]):
        if theirs is not None:
            torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12)
    initial = {n: p.detach() for n, p in Net(routed).double().named_parameters()}
    assert _max_delta(reference["params"], initial) > 1e-3  # the run moved: not an empty check


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_exact_against_one_process_on_the_global_batch(results, name: str) -> None:
    scenario = SCENARIOS[name]
    _assert_exact(name, results(name), train(scenario), scenario["routed"])


@pytest.mark.distributed
def test_uneven_shards_without_batch_size_are_the_mean_of_rank_means(results) -> None:
    """Without batch_size= the ranks count alike: not the global mean when shards differ."""
    got = results("uneven_without_batch_size")
    delta = _max_delta(got[0]["params"], train(UNEVEN_WITHOUT_BATCH_SIZE)["params"])
    print(f"uneven shards without batch_size=: max |Δ| = {delta:.3g}")
    assert delta > 1e-4


@pytest.mark.distributed
def test_heads_reached_by_one_rank_only_need_model(results) -> None:
    for outcome in results("routed_without_model"):
        assert outcome["error"] == "InputError"
        assert "model=model" in outcome["message"]


@pytest.mark.distributed
def test_a_different_pipeline_on_one_rank_is_refused_on_every_rank(results) -> None:
    for rank, outcome in enumerate(results("drift")):
        assert outcome["error"] == "ConfigError"
        assert "seed" in outcome["message"] and f"seed = {3 + rank}" in outcome["message"]


@pytest.mark.distributed
def test_explicit_layerwise_is_refused_under_data_parallelism(results) -> None:
    for outcome in results("layerwise"):
        assert outcome["error"] == "ConfigError" and "not exact" in outcome["message"]


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["fast", "features", "params", "micro", "nan_raise"])
def test_an_error_on_one_rank_stops_every_rank_within_seconds(results, kind: str) -> None:
    failed, peer = results(f"failure_{kind}")
    if kind == "nan_raise":
        assert failed["error"] == peer["error"] == "NonFiniteError"
    else:
        assert failed["error"] == "InputError"
        assert peer["error"] == "DistributedError" and "rank(s) [0]" in peer["message"]
    lag = peer["at"] - failed["at"]
    print(f"{kind}: the surviving rank raised {lag * 1e3:.1f} ms after the failing one")
    assert lag < 10.0


@pytest.mark.distributed
def test_logs_are_written_once_under_data_parallelism(worker_dir: Path, results) -> None:
    """Every rank computes the same statistics; rank 0 alone writes them (one parsable line per
    step, the same CSV), or each rank its own rank-suffixed files with ``ranks: all``."""
    import csv
    import json

    results("logging")
    lines = (worker_dir / "main.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3]
    with open(worker_dir / "main.csv", newline="") as handle:
        assert [row["step"] for row in csv.DictReader(handle)] == ["0", "1", "2", "3"]
    per_rank = [
        [json.loads(line) for line in (worker_dir / f"all.rank{r}.jsonl").read_text().splitlines()]
        for r in range(WORLD)
    ]
    assert [r["step"] for r in per_rank[0]] == [0, 1, 2, 3]
    assert per_rank[0] == per_rank[1]  # the same global statistics on both ranks
    assert not (worker_dir / "all.jsonl").exists()


def test_uneven_batch_size_must_be_an_integer() -> None:
    mtl = MTL({"tasks": TASKS})
    model = Net().double()
    x, y = data(4)
    _, outputs = model(x)
    with pytest.raises(InputError, match="batch_size"):
        mtl.backward(losses_of(outputs, y), batch_size=0)


if __name__ == "__main__":
    from worker_exit import run_worker

    run_worker(_worker, Path(sys.argv[1]))
