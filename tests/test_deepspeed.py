"""DeepSpeed ZeRO through Accelerate on two CPU processes against one process on the global batch.

Runs where ``deepspeed`` is installed and starts on CPU (``pip install torch==2.13.0 deepspeed``);
skipped otherwise, with the reason. One launch of two workers (this file run as a script) runs
every scenario; each saves its final parameters and each step's Gramian and weights.

DeepSpeed's ZeRO optimizers keep float32 master weights and update them in float32 even for a
float64 model: the parameters then follow the single process to float32 precision only, while
the Gramian and weights of the first step (computed by mtlhooks before DeepSpeed sees a
gradient) equal it to float64 precision.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mtlhooks import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import WORLD, launch
from test_fsdp import STATIC, TASKS, Net, _record, _rows, data, losses_of, reference, spec

SCENARIOS: dict[str, dict[str, Any]] = {
    "zero2_static": spec({"plugins": [STATIC]}, stage=2),
    "zero2_dwa": spec({"plugins": [{"name": "dwa", "temperature": 0.5}]}, stage=2, steps=4),
    "zero2_mgda_features": spec({"plugins": ["mgda"], "space": "features"}, stage=2),
    "zero2_pcgrad_features_accumulate": spec(
        {"plugins": ["pcgrad"], "space": "features"},
        stage=2,
        accumulation=2,
        reference_micro_steps=True,
    ),
    "zero2_avgnorm_mgda_last_shared": spec(
        {"plugins": ["avgnorm", "mgda"], "space": "last_shared"}, stage=2
    ),
    "zero1_upgrad_features": spec({"plugins": ["upgrad"], "space": "features"}, stage=1),
    # ZeRO-3 takes float16, bfloat16 or float32 parameters only.
    "zero3_static": spec({"plugins": [STATIC]}, stage=3, dtype=torch.float32),
}


def train(spec: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DeepSpeedPlugin

    from mtlhooks.integrations.accelerate import AcceleratedMTL

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    micro = spec["accumulation"]
    config = {
        "train_micro_batch_size_per_gpu": spec["batch"] // micro // world,
        "gradient_accumulation_steps": micro,
        "zero_optimization": {"stage": spec["stage"]},
        "gradient_clipping": 0.0,
    }
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config), gradient_accumulation_steps=micro
    )
    x_all, y_all = data()
    dtype = spec.get("dtype", torch.float64)
    model = Net().to(dtype)
    mtl = AcceleratedMTL(accelerator, spec["config"], shared=model.encoder, model=model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    net, optimizer = accelerator.prepare(model, optimizer)
    reports = []
    for step in range(spec["steps"]):
        for rows in _rows(spec, step, rank, world, micro):
            x, y = x_all[rows].to(dtype), {t: v[rows].to(dtype) for t, v in y_all.items()}
            with mtl.accumulate(net):
                z, outputs = net(x)
                report = mtl.backward(losses_of(outputs, y), features=z)
                optimizer.step()
                optimizer.zero_grad()
        reports.append(_record(report))
    params = _gathered(net, spec["stage"])
    return {"params": params, "reports": reports, "type": str(accelerator.distributed_type)}


def _gathered(engine: Any, stage: int) -> dict[str, torch.Tensor]:
    if stage < 3:
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    import deepspeed

    named = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {n: p.detach().clone() for n, p in named}


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    results: dict[str, Any] = {}
    try:
        import deepspeed  # noqa: F401
        from accelerate.utils import is_deepspeed_available

        if not is_deepspeed_available():
            raise ImportError("accelerate does not see deepspeed")
    except Exception as error:  # the package is there but does not start here
        torch.save({"unavailable": f"{type(error).__name__}: {error}"}, out / f"rank{rank}.pt")
        return
    for name, scenario in SCENARIOS.items():
        results[name] = train(scenario, rank, world)
    torch.save(results, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], list[Any]]:
    pytest.importorskip("accelerate")
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install torch==2.13.0 deepspeed)")
    out = tmp_path_factory.mktemp("deepspeed")
    launch([sys.executable, str(Path(__file__).resolve()), str(out)], timeout=600.0)
    loaded = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    if "unavailable" in loaded[0]:
        pytest.skip(f"deepspeed does not start on CPU here: {loaded[0]['unavailable']}")
    return lambda name: [ranks[name] for ranks in loaded]


DELTAS: dict[str, float] = {}


def _max_delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_deepspeed_matches_one_process_on_the_global_batch(results, name: str) -> None:
    """Loss-level plugins (ZeRO 2 and 3) and surgery in spaces features and last_shared (ZeRO 1
    and 2, with accumulation): the first step's Gramian and weights equal the single process
    to float64 precision, the final parameters to DeepSpeed's float32 master weights."""
    got = results(name)
    want = reference(SCENARIOS[name])
    assert all("DEEPSPEED" in r["type"] for r in got)
    for key, value in got[0]["params"].items():
        assert torch.equal(value, got[1]["params"][key]), f"ranks differ in {key}"
    DELTAS[name] = _max_delta(got[0]["params"], want["params"])
    first, expected = got[0]["reports"][0], want["reports"][0]
    for key in ("gramian", "weights"):
        if expected[key] is None:
            assert first[key] is None
        else:
            exact = 1e-12 if SCENARIOS[name].get("dtype", torch.float64) == torch.float64 else 1e-5
            torch.testing.assert_close(first[key], expected[key], rtol=exact, atol=exact)
    step0 = (
        0.0
        if expected["gramian"] is None
        else float((first["gramian"] - expected["gramian"]).abs().max())
    )
    print(f"{name}: max |Δ params| = {DELTAS[name]:.3g}, step-0 |Δ Gramian| = {step0:.3g}")
    tol = 1e-6 if SCENARIOS[name].get("dtype", torch.float64) == torch.float64 else 1e-5
    for key, value in got[0]["params"].items():
        torch.testing.assert_close(value.double(), want["params"][key], rtol=tol, atol=tol)
    for mine, theirs in zip(got[0]["reports"], want["reports"]):
        for key in ("gramian", "weights"):
            if theirs[key] is not None:
                torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6)


def _stub(stage: int) -> Any:
    from accelerate.utils import DistributedType

    return SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        num_processes=1,
        device=torch.device("cpu"),
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)),
        register_for_checkpointing=lambda *objects: None,
        register_save_state_pre_hook=lambda hook: None,
    )


@pytest.mark.parametrize(
    ("stage", "config", "match"),
    [
        (2, {"plugins": ["pcgrad"], "space": "params"}, r"space 'params'.*FSDP2"),
        (3, {"plugins": ["mgda"], "space": "features"}, r"ZeRO-3.*ZeRO stage 1 or 2.*FSDP2"),
        (2, {"plugins": ["mgda"], "space": "features"}, r"model=model"),
    ],
)
def test_deepspeed_refusals_name_the_alternative(
    stage: int, config: dict[str, Any], match: str
) -> None:
    pytest.importorskip("accelerate")
    from mtlhooks.integrations.accelerate import AcceleratedMTL

    model = Net().double()
    with pytest.raises(ConfigError, match=match):
        AcceleratedMTL(_stub(stage), {"tasks": TASKS, **config}, shared=model.encoder)


if __name__ == "__main__":
    from worker_exit import run_worker

    run_worker(_worker, Path(sys.argv[1]))
