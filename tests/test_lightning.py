"""PyTorch Lightning through :mod:`mtlhooks.integrations.lightning`, against plain loops.

Every run trains the problems' MLP from the same initialisation on the same data; the
reference is a plain PyTorch loop on one process, on the global batch. Two worker processes
(this file run as a script, on a free port, as in ``test_distributed``) run Lightning's
``strategy="ddp"`` for each scenario of :data:`DDP_SCENARIOS` and save their parameters.

The hand-made set-ups of the issue (``mtl.backward`` called directly in manual optimisation;
an MTL built in ``__init__``) are run too: the same comparison fails on them, which is what the
integration fixes.
"""

from __future__ import annotations

import copy
import os
import runpy
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import Logger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy  # noqa: E402

from mtlhooks import MTL, ConfigError, InputError, functional  # noqa: E402
from mtlhooks.integrations import ddp as mtl_ddp  # noqa: E402
from mtlhooks.integrations.lightning import (  # noqa: E402
    CHECKPOINT_KEY,
    MTLModule,
    check_strategy,
)
from mtlhooks.problems import MultiTaskMLP, make_regression  # noqa: E402

TASKS = ("t0", "t1", "t2")
WORLD = 2


def problem(dtype: torch.dtype = torch.float64) -> tuple[Any, MultiTaskMLP]:
    data = make_regression(
        sigmas=(1.0, 3.0, 10.0), n_train=96, n_test=8, in_dim=6, out_dim=2, seed=0, dtype=dtype
    )
    return data, MultiTaskMLP(6, 10, data.task_out_dims, depth=2, seed=1).to(dtype)


def spec(plugins: list[Any], space: str, **options: Any) -> dict[str, Any]:
    out = {
        "config": {"tasks": TASKS, "seed": 3, "space": space, "plugins": plugins},
        "steps": 3,
        "batch": 16,  # global samples per optimizer step
        "accumulation": 1,
        "manual": False,
        "lr": 0.05,
        "momentum": 0.0,
        "kind": "integration",  # or a hand-made set-up: "direct", "init"
    }
    out.update(options)
    return out


class Rows(torch.utils.data.Dataset):
    def __init__(self, data: Any, count: int) -> None:
        self.data, self.count = data, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.data.x_train[i], {t: self.data.y_train[t][i] for t in TASKS}


class _Body:
    """The model and the loop body shared by the integration and the hand-made modules."""

    def build(self, settings: dict[str, Any], model: MultiTaskMLP, data: Any) -> None:
        self.settings = settings
        self.encoder = model.encoder
        self.heads = model.heads
        self.data = data
        self.automatic_optimization = not settings["manual"]

    def losses(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        z = self.encoder(x)
        return z, self.data.losses({t: head(z) for t, head in self.heads.items()}, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        s = self.settings
        return torch.optim.SGD(self.parameters(), lr=s["lr"], momentum=s["momentum"])


class Net(_Body, MTLModule):
    def __init__(self, settings: dict[str, Any], model: MultiTaskMLP, data: Any) -> None:
        super().__init__()
        self.build(settings, model, data)
        if settings["kind"] == "prebuilt":
            self.mtl = MTL(settings["config"], shared=self.encoder)

    def configure_mtl(self) -> MTL:
        return MTL(self.settings["config"], shared=self.encoder)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        z, losses = self.losses(batch)
        if self.automatic_optimization:
            return self.mtl_step(losses, features=z)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.mtl_backward(losses, features=z)
        optimizer.step()
        return None


class HandMade(_Body, pl.LightningModule):
    """What a user writes without the integration, manual optimisation: ``direct`` builds the
    MTL in ``setup()`` and calls ``mtl.backward``; ``init`` builds it in ``__init__`` and runs
    its backward through ``manual_backward``."""

    def __init__(self, settings: dict[str, Any], model: MultiTaskMLP, data: Any) -> None:
        super().__init__()
        self.build(settings, model, data)
        if settings["kind"] == "init":
            self.mtl = MTL(settings["config"], shared=self.encoder, backward_fn=self._backward)

    def _backward(self, total: torch.Tensor) -> None:
        self.manual_backward(total)

    def setup(self, stage: str) -> None:
        if self.settings["kind"] == "direct":
            self.mtl = MTL(self.settings["config"], shared=self.encoder)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        z, losses = self.losses(batch)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.mtl.backward(losses, features=z)
        optimizer.step()


def trainer(settings: dict[str, Any], world: int = 1, **options: Any) -> Any:
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": world,
        "strategy": "ddp" if world > 1 else "auto",
        "max_steps": settings["steps"],
        "accumulate_grad_batches": 1 if settings["manual"] else settings["accumulation"],
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "use_distributed_sampler": False,
    }
    kwargs.update(options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pl.Trainer(**kwargs)


def loader(settings: dict[str, Any], data: Any, world: int) -> Any:
    """Rank r takes rows r, r + R, r + 2R, ... in order (Lightning's own DistributedSampler
    shuffles here), so each optimizer step sees the reference's global batch."""
    per_rank = settings["batch"] // world // settings["accumulation"]
    rows = Rows(data, settings["steps"] * settings["batch"])
    sampler = None
    if world > 1:
        rank = int(os.environ["RANK"])
        sampler = torch.utils.data.DistributedSampler(rows, world, rank, shuffle=False)
    return torch.utils.data.DataLoader(rows, batch_size=per_rank, sampler=sampler)


def fit(settings: dict[str, Any], world: int = 1, **options: Any) -> dict[str, Any]:
    data, model = problem(options.pop("dtype", torch.float64))
    module_class = Net if settings["kind"] in ("integration", "prebuilt") else HandMade
    module = module_class(settings, model, data)
    run = trainer(settings, world, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(module, loader(settings, data, world))
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "divergence": mtl_ddp.parameter_divergence(model),
        "module": module,
    }


def reference(settings: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One process, plain loop, the whole global batch per optimizer step."""
    data, model = problem()
    mtl = MTL(settings["config"], shared=model.encoder, communicator=False)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings["lr"], momentum=settings["momentum"]
    )
    batch = settings["batch"]
    for step in range(settings["steps"]):
        rows = slice(step * batch, (step + 1) * batch)
        z, outputs = model(data.x_train[rows])
        losses = data.losses(outputs, {t: data.y_train[t][rows] for t in TASKS})
        mtl.backward(losses, features=z)
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


def assert_equals_reference(name: str, got: dict[str, torch.Tensor], settings: Any) -> None:
    want = reference(settings)
    delta = max_delta(got, want)
    print(f"{name}: max |Δ params| vs one process on the global batch = {delta:.3g}")
    _, initial = problem()
    assert max_delta({n: p.detach() for n, p in initial.named_parameters()}, want) > 1e-3
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], rtol=1e-9, atol=1e-10, msg=key)


MGDA_FEATURES = (["mgda"], "features")
PCGRAD_PARAMS = (["pcgrad", "gradstats"], "params")

DDP_SCENARIOS: dict[str, dict[str, Any]] = {
    "auto_features": spec(*MGDA_FEATURES),
    "auto_params_accumulate": spec(*PCGRAD_PARAMS, accumulation=2),
    "manual_features": spec(*MGDA_FEATURES, manual=True),
    "manual_params": spec(*PCGRAD_PARAMS, manual=True),
    "handmade_direct": spec(*MGDA_FEATURES, manual=True, kind="direct"),
    "handmade_init": spec(*MGDA_FEATURES, manual=True, kind="init"),
    "prebuilt_is_refused": spec(*MGDA_FEATURES, kind="prebuilt"),
}


# -- the worker processes -----------------------------------------------------------------------


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for name, settings in DDP_SCENARIOS.items():
        try:
            result = fit(settings, WORLD)
            result.pop("module")
        except InputError as error:
            result = {"error": str(error)}
        torch.save(result, out / f"{name}.rank{rank}.pt")
        # Each scenario starts as a fresh script does: before the Trainer creates the process
        # group (the MTL of "handmade_init" / "prebuilt_is_refused" is built before it).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from test_distributed import launch

    out = tmp_path_factory.mktemp("lightning")
    launch([sys.executable, str(Path(__file__).resolve()), str(out)], timeout=300)

    def load(name: str) -> list[dict[str, Any]]:
        return [torch.load(out / f"{name}.rank{r}.pt", weights_only=False) for r in range(WORLD)]

    return load


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name", ["auto_features", "auto_params_accumulate", "manual_features", "manual_params"]
)
def test_ddp_equals_one_process_on_the_global_batch(ddp_results: Any, name: str) -> None:
    """``strategy="ddp"`` on 2 processes, automatic and manual optimisation, spaces features
    (MGDA) and params (PCGrad, with ``accumulate_grad_batches=2`` against a batch twice as
    large): both ranks end identical and equal one plain process on the global batch."""
    results = ddp_results(name)
    assert all(r["divergence"] == 0.0 for r in results)
    assert_equals_reference(name, results[0]["params"], DDP_SCENARIOS[name])


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["handmade_direct", "handmade_init"])
def test_hand_made_ddp_set_ups_fail_the_same_comparison(ddp_results: Any, name: str) -> None:
    """The issue's silent failures, as a user writes them without the integration: calling
    ``mtl.backward`` in manual optimisation skips the DDP reducer (the ranks drift apart); an
    MTL built in ``__init__`` has no communicator (each rank weights its own gradients)."""
    results = ddp_results(name)
    with pytest.raises(AssertionError):
        assert all(r["divergence"] == 0.0 for r in results)
        assert_equals_reference(name, results[0]["params"], DDP_SCENARIOS[name])
    print(f"{name}: rank divergence {results[0]['divergence']:.3g}")


@pytest.mark.distributed
def test_an_mtl_built_before_the_process_group_is_refused(ddp_results: Any) -> None:
    for result in ddp_results("prebuilt_is_refused"):
        assert "communicator is none" in result["error"]
        assert "configure_mtl()" in result["error"]


# -- one process --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "auto_features",
        "auto_params_accumulate",
        "manual_features",
        "manual_params",
    ],
)
def test_one_process_equals_the_plain_loop(name: str) -> None:
    """The same scenarios on one process: Lightning's loop through the integration equals the
    plain loop (K = 2 accumulation in space params equals the batch twice as large)."""
    assert_equals_reference(name, fit(DDP_SCENARIOS[name])["params"], DDP_SCENARIOS[name])


def test_resume_from_a_checkpoint_is_bit_for_bit(tmp_path: Path) -> None:
    """Two epochs straight equal one epoch, ``trainer.save_checkpoint``, and ``fit(ckpt_path=)``
    into a module with other initial weights; without the pipeline's state in the checkpoint
    (DWA's history, AvgNorm's averages, PCGrad's generator) they differ."""
    plugins = ["dwa", {"name": "avgnorm", "ema": 0.5}, "pcgrad"]
    settings = spec(plugins, "params", steps=2, momentum=0.9)

    def module() -> Any:
        data, model = problem()
        return Net(settings, model, data), model, data

    def params(model: MultiTaskMLP) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def train(net: Any, data: Any, epochs: int, ckpt: Path | None = None) -> Any:
        run = trainer(settings, max_steps=-1, max_epochs=epochs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="^(?!the checkpoint holds no mtlhooks)")
            run.fit(net, loader(settings, data, 1), ckpt_path=None if ckpt is None else str(ckpt))
        return run

    net, straight, data = module()
    train(net, data, 2)
    net, _, data = module()
    train(net, data, 1).save_checkpoint(str(tmp_path / "one.ckpt"))
    checkpoint = torch.load(tmp_path / "one.ckpt", weights_only=False)
    assert checkpoint[CHECKPOINT_KEY]["index"] == 2
    del checkpoint[CHECKPOINT_KEY]
    torch.save(checkpoint, tmp_path / "without.ckpt")

    results = {}
    for name in ("one", "without"):
        net, resumed, data = module()
        with torch.no_grad():
            for p in resumed.parameters():
                p.add_(1.0)
        if name == "without":
            with pytest.warns(UserWarning, match="no mtlhooks state"):
                train(net, data, 2, tmp_path / f"{name}.ckpt")
        else:
            train(net, data, 2, tmp_path / f"{name}.ckpt")
        results[name] = params(resumed)
    want = params(straight)
    assert all(torch.equal(want[n], results["one"][n]) for n in want)
    without = max_delta(want, results["without"])
    print(f"resumed without the pipeline's state: max |Δ| = {without:.3g}")
    assert without > 1e-9


def test_fp16_grad_scaler_of_the_precision_plugin_is_used_once() -> None:
    """``16-mixed`` with a GradScaler (CPU autocast float16 here): the integration passes the
    precision plugin's scaler to the pipeline and lets Lightning scale its backward, so the
    gradients are scaled exactly once: equal to the plain loop with the same scaler."""
    settings = spec(["pcgrad"], "params")
    init = 2.0**10
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init))
    got = fit(settings, plugins=[plugin], dtype=torch.float32)["params"]

    data, model = problem(torch.float32)
    mtl = MTL(settings["config"], shared=model.encoder, communicator=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings["lr"])
    scaler = torch.amp.GradScaler("cpu", init_scale=init)
    batch = settings["batch"]
    for step in range(settings["steps"]):
        rows = slice(step * batch, (step + 1) * batch)
        with torch.autocast("cpu", dtype=torch.float16):
            z, outputs = model(data.x_train[rows])
            losses = data.losses(outputs, {t: data.y_train[t][rows] for t in TASKS})
        mtl.backward(losses, features=z, loss_scale=scaler)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    want = {n: p.detach() for n, p in model.named_parameters()}
    print(f"16-mixed: max |Δ params| vs plain loop = {max_delta(got, want):.3g}")
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_bf16_mixed_manual_optimisation_solves_in_float32() -> None:
    """Lightning runs a manual ``training_step`` inside bf16 autocast: the pipeline's Gramian
    and MGDA weights are still float32 and agree with an exact solve of that Gramian."""
    settings = spec(["mgda"], "features", manual=True, steps=1)
    module = fit(settings, precision="bf16-mixed", dtype=torch.float32)["module"]
    report = module.mtl_report
    assert report.gramian.dtype == torch.float32
    exact = functional.mgda(report.gramian.double())
    torch.testing.assert_close(report.weights.double(), exact, rtol=1e-5, atol=1e-6)


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def test_gradstats_reach_the_lightning_loggers_at_the_global_step() -> None:
    settings = spec(*PCGRAD_PARAMS)
    logger = MemoryLogger()
    module = fit(settings, logger=logger)["module"]
    records = [(step, m) for step, m in logger.logged if "gradstats/grad_norms/t0" in m]
    assert [step for step, _ in records] == [0, 1, 2]
    last = module.mtl.plugins["gradstats"].last_record
    assert records[-1][1]["gradstats/grad_norms/t0"] == pytest.approx(last["grad_norms"]["t0"])


def test_a_changed_training_step_loss_is_refused() -> None:
    class Doubled(Net):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return 2 * super().training_step(batch, batch_idx)

    data, model = problem()
    settings = spec(*MGDA_FEATURES, steps=1)
    with pytest.raises(InputError, match="not the sum of the losses given to mtl_step"):
        trainer(settings).fit(Doubled(settings, model, data), loader(settings, data, 1))


def test_deepspeed_and_sharded_strategies_are_refused() -> None:
    _, model = problem()
    readers = MTL({"tasks": TASKS, "plugins": ["pcgrad"]}, shared=model.encoder)
    loss_level = MTL({"tasks": TASKS, "plugins": ["dwa"]})
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # DeepSpeed itself is not installed
    fsdp = FSDPStrategy.__new__(FSDPStrategy)
    for mtl in (readers, loss_level):
        with pytest.raises(ConfigError, match="DeepSpeed strategies are not supported"):
            check_strategy(deepspeed, mtl)
    with pytest.raises(ConfigError, match=r"FSDPStrategy is not supported.*pcgrad"):
        check_strategy(fsdp, readers)
    check_strategy(fsdp, loss_level)


def test_wrong_calls_name_the_right_one() -> None:
    data, model = problem()
    net = Net(spec(*MGDA_FEATURES), model, data)
    with pytest.raises(InputError, match="configure_mtl"):
        net._built()
    net.automatic_optimization = False
    with pytest.raises(InputError, match="mtl_backward"):
        net.mtl_step({}, features=None)
    net.automatic_optimization = True
    with pytest.raises(InputError, match="mtl_step"):
        net.mtl_backward({})
    with pytest.raises(NotImplementedError, match="configure_mtl"):
        MTLModule().configure_mtl()
    copy.deepcopy(net)  # the module stays copyable (Lightning deep-copies modules at times)


def test_the_example_runs_as_written(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """``examples/lightning_train.py``, small: automatic and manual optimisation."""
    script = Path(__file__).resolve().parents[1] / "examples" / "lightning_train.py"
    for extra in ([], ["--manual", "--space", "features", "--plugins", "mgda"]):
        argv = ["lightning_train.py", "--steps", "4", "--n-train", "128", *extra]
        monkeypatch.setattr(sys, "argv", argv)
        runpy.run_path(str(script), run_name="__main__")
        out = capsys.readouterr().out
        assert "gradient space: " + ("features" if extra else "params") in out
        assert "test RMSE / σ" in out


if __name__ == "__main__":
    from worker_exit import run_worker

    run_worker(_worker, Path(sys.argv[1]))
