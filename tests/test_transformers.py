"""The Hugging Face Trainer through :mod:`mtlhooks.integrations.transformers`.

The model is the problems' MLP wrapped so that its forward returns per-task losses (the
contract of ``MTLTrainer``); the reference is a plain loop on one process, on the batch of one
optimizer step.
"""

from __future__ import annotations

import os
import runpy
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transformers import Trainer, TrainingArguments

from mtlhooks import MTL, ConfigError, InputError
from mtlhooks.integrations.accelerate import AcceleratedMTL
from mtlhooks.integrations.transformers import STATE_FILE, MTLTrainer
from mtlhooks.problems import MultiTaskMLP, make_regression

TASKS = ("t0", "t1", "t2")
PCGRAD = {"tasks": TASKS, "seed": 3, "space": "params", "plugins": ["pcgrad", "gradstats"]}


class TaskLosses(nn.Module):
    """``forward(x, t0, t1, t2)`` returns ``{"losses": {task: mse}, "features": z}``."""

    def __init__(self, mlp: MultiTaskMLP) -> None:
        super().__init__()
        self.encoder, self.heads = mlp.encoder, mlp.heads

    def forward(
        self, x: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor
    ) -> dict[str, Any]:
        z = self.encoder(x)
        targets = {"t0": t0, "t1": t1, "t2": t2}
        losses = {t: nn.functional.mse_loss(head(z), targets[t]) for t, head in self.heads.items()}
        return {"losses": losses, "features": z}


class Rows(torch.utils.data.Dataset):
    def __init__(self, data: Any, count: int) -> None:
        self.data, self.count = data, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.data.x_train[i], **{t: self.data.y_train[t][i] for t in TASKS}}


def problem(dtype: torch.dtype = torch.float64) -> tuple[Any, TaskLosses]:
    data = make_regression(
        sigmas=(1.0, 3.0, 10.0), n_train=96, n_test=8, in_dim=6, out_dim=2, seed=0, dtype=dtype
    )
    return data, TaskLosses(MultiTaskMLP(6, 10, data.task_out_dims, depth=2, seed=1).to(dtype))


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def arguments(tmp_path: Path, **options: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 2,
        "max_steps": 3,
        "learning_rate": 0.05,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "train_sampling_strategy": "sequential",
        "report_to": "none",
        "disable_tqdm": True,
        "logging_strategy": "no",
        "save_strategy": "no",
        "seed": 0,
    }
    settings.update(options)
    return TrainingArguments(**settings)


def trainer(
    tmp_path: Path, config: Any = PCGRAD, *, momentum: float = 0.0, cls: type = MTLTrainer, **args
) -> tuple[Any, TaskLosses]:
    data, model = problem(args.pop("dtype", torch.float64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
    shared = model.encoder if args.pop("shared", True) else None
    extra = {"mtl": config, "mtl_shared": shared} if cls is MTLTrainer else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = cls(
            model=model,
            args=arguments(tmp_path, **args),
            train_dataset=Rows(data, 48),
            optimizers=(optimizer, None),
            **extra,
        )
    return run, model


def train(run: Any, **kwargs: Any) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="^(?!.*holds no mtlhooks_state)")
        run.train(**kwargs)


def reference(config: Any, steps: int = 3, batch: int = 16) -> dict[str, torch.Tensor]:
    data, model = problem()
    mtl = MTL(config, shared=model.encoder, communicator=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        rows = slice(step * batch, (step + 1) * batch)
        out = model(data.x_train[rows], **{t: data.y_train[t][rows] for t in TASKS})
        mtl.backward(out["losses"], features=out["features"])
        optimizer.step()
        optimizer.zero_grad()
    return params(model)


def max_delta(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


def test_accumulation_equals_one_big_batch_in_space_params(tmp_path: Path) -> None:
    """``gradient_accumulation_steps=2`` with batches of 8 equals the plain loop on batches of
    16: PCGrad aggregates once per optimizer step, on the mean of the micro-steps."""
    run, model = trainer(tmp_path)
    train(run)
    want = reference(PCGRAD)
    delta = max_delta(params(model), want)
    print(f"Trainer K=2, params: max |Δ params| vs one big batch = {delta:.3g}")
    _, initial = problem()
    assert max_delta(params(initial), want) > 1e-3
    torch.testing.assert_close(params(model), want, rtol=1e-9, atol=1e-10)
    assert [r.accumulating for r in [run.mtl_report]] == [False]


def test_features_space_with_accumulation_follows_the_micro_steps(tmp_path: Path) -> None:
    """Space features aggregates every micro-step on its own: equal to the plain loop doing the
    same micro-steps (losses divided by K) with one optimizer step per K. Here z is the
    ``features`` the model returns (no ``mtl_shared`` module to take it from)."""
    config = {**PCGRAD, "space": "features", "plugins": ["mgda"]}
    run, model = trainer(tmp_path, config, shared=False)
    train(run)
    data, ref = problem()
    mtl = MTL(config, communicator=False)
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.05)
    for step in range(3):
        for micro in range(2):
            rows = slice(step * 16 + micro * 8, step * 16 + (micro + 1) * 8)
            out = ref(data.x_train[rows], **{t: data.y_train[t][rows] for t in TASKS})
            mtl.backward({t: v / 2 for t, v in out["losses"].items()}, features=out["features"])
        optimizer.step()
        optimizer.zero_grad()
    torch.testing.assert_close(params(model), params(ref), rtol=1e-9, atol=1e-10)


def test_hand_made_accelerated_mtl_in_the_trainer_is_k_times_too_large(tmp_path: Path) -> None:
    """The issue's hand-made set-up: ``AcceleratedMTL(trainer.accelerator, ...)`` called from
    ``training_step`` divides by ``accelerator.gradient_accumulation_steps``, which is 1 inside
    the Trainer: the first update is K = 2 times the big batch's."""

    class HandMade(Trainer):
        def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
            if not hasattr(self, "mtl"):
                self.mtl = AcceleratedMTL(self.accelerator, PCGRAD, shared=model.encoder)
            out = model(**self._prepare_inputs(inputs))
            self.mtl.backward(out["losses"])
            return sum(out["losses"].values()).detach()

    _, initial = problem()
    start = params(initial)
    hand, hand_model = trainer(tmp_path, cls=HandMade, max_steps=1)
    train(hand)
    ours, our_model = trainer(tmp_path, max_steps=1)
    train(ours)
    want = reference(PCGRAD, steps=1)
    hand_step = torch.cat([(params(hand_model)[n] - start[n]).reshape(-1) for n in start])
    our_step = torch.cat([(params(our_model)[n] - start[n]).reshape(-1) for n in start])
    want_step = torch.cat([(want[n] - start[n]).reshape(-1) for n in start])
    torch.testing.assert_close(our_step, want_step, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(hand_step, 2 * want_step, rtol=1e-9, atol=1e-12)


DDP_SCENARIOS: dict[str, dict[str, Any]] = {
    # 2 processes × 4 rows × K = 2 micro-steps: the reference's 16 rows per optimizer step.
    "ddp_params_accumulate": {"config": PCGRAD, "per_device_train_batch_size": 4},
    "ddp_features": {
        "config": {**PCGRAD, "space": "features", "plugins": ["mgda"]},
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
    },
}


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    for name, scenario in DDP_SCENARIOS.items():
        options = {k: v for k, v in scenario.items() if k != "config"}
        run, model = trainer(out / name, scenario["config"], ddp_backend="gloo", **options)
        train(run)
        torch.save(params(model), out / f"{name}.rank{rank}.pt")
    torch.distributed.barrier()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from test_distributed import launch

    out = tmp_path_factory.mktemp("transformers")
    launch([sys.executable, str(Path(__file__).resolve()), str(out)], timeout=300)

    def load(name: str) -> list[dict[str, torch.Tensor]]:
        return [torch.load(out / f"{name}.rank{r}.pt") for r in range(2)]

    return load


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(DDP_SCENARIOS))
def test_the_trainers_ddp_equals_one_process(ddp_results: Any, name: str) -> None:
    """Two processes through the Trainer's own Accelerator (DDP, gloo): PCGrad in space params
    with K = 2 accumulation, MGDA in space features; both ranks end identical and equal the
    plain loop on the global batch."""
    first, second = ddp_results(name)
    assert all(torch.equal(first[n], second[n]) for n in first)
    want = reference(DDP_SCENARIOS[name]["config"])
    print(f"Trainer DDP {name}: max |Δ params| vs one process = {max_delta(first, want):.3g}")
    torch.testing.assert_close(first, want, rtol=1e-9, atol=1e-10)


def test_resume_from_checkpoint_is_bit_for_bit(tmp_path: Path) -> None:
    """Four optimizer steps straight, saving at step 2, equal a new Trainer (other initial
    weights) resumed from checkpoint-2; without the pipeline's state they differ."""
    config = {**PCGRAD, "plugins": ["dwa", {"name": "avgnorm", "ema": 0.5}, "pcgrad"]}
    options = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "momentum": 0.9}
    run, straight = trainer(tmp_path / "run", config, **options)
    train(run)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / STATE_FILE).is_file()
    bare = tmp_path / "bare" / "checkpoint-2"
    shutil.copytree(checkpoint, bare)
    (bare / STATE_FILE).unlink()

    results = {}
    for name, source in (("resumed", checkpoint), ("bare", bare)):
        resumed, model = trainer(source.parent, config, **options)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        if name == "bare":
            with pytest.warns(UserWarning, match="holds no mtlhooks_state"):
                train(resumed, resume_from_checkpoint=str(source))
        else:
            train(resumed, resume_from_checkpoint=str(source))
        results[name] = params(model)
    want = params(straight)
    assert all(torch.equal(want[n], results["resumed"][n]) for n in want)
    without = max_delta(want, results["bare"])
    print(f"Trainer resumed without the pipeline's state: max |Δ| = {without:.3g}")
    assert without > 1e-9


def test_bf16_follows_the_plain_autocast_loop(tmp_path: Path) -> None:
    """``bf16=True`` on CPU: the forward runs under the Accelerator's autocast; the result
    follows the plain loop under ``torch.autocast(bfloat16)`` to bf16 precision."""
    run, model = trainer(tmp_path, bf16=True, dtype=torch.float32)
    train(run)
    data, ref = problem(torch.float32)
    mtl = MTL(PCGRAD, shared=ref.encoder, communicator=False)
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.05)
    for step in range(3):
        rows = slice(step * 16, (step + 1) * 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ref(data.x_train[rows], **{t: data.y_train[t][rows] for t in TASKS})
        mtl.backward(out["losses"])
        optimizer.step()
        optimizer.zero_grad()
    delta = max_delta(params(model), params(ref))
    print(f"Trainer bf16: max |Δ params| vs plain autocast loop = {delta:.3g}")
    assert delta < 5e-3
    assert run.mtl_report.gramian.dtype == torch.float32


def test_gradstats_go_through_trainer_log(tmp_path: Path) -> None:
    run, _ = trainer(tmp_path)
    train(run)
    logged = [entry for entry in run.state.log_history if "gradstats/grad_norms/t0" in entry]
    # Recorded at the micro-step that aggregates, before the optimizer step.
    assert [entry["step"] for entry in logged] == [0, 1, 2]
    last = run.mtl.plugins["gradstats"].last_record
    assert logged[-1]["gradstats/grad_norms/t0"] == pytest.approx(last["grad_norms"]["t0"])


def test_refusals_name_the_fix(tmp_path: Path) -> None:
    _, model = problem()
    with pytest.raises(InputError, match="takes the pipeline's config, not an MTL"):
        MTLTrainer(model=model, args=arguments(tmp_path), mtl=MTL(PCGRAD, shared=model.encoder))
    reentrant = {"activation_checkpointing": True, "activation_checkpointing_kwargs": {}}
    with pytest.raises(ConfigError, match="use_reentrant': False"):
        trainer(tmp_path, **reentrant)
    not_reentrant = {"activation_checkpointing_kwargs": {"use_reentrant": False}}
    trainer(tmp_path, **{**reentrant, **not_reentrant})
    trainer(tmp_path, {**PCGRAD, "space": "features", "plugins": ["mgda"]}, **reentrant)

    class NoLosses(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(6, 1).double()

        def forward(self, x: torch.Tensor, **targets: torch.Tensor) -> dict[str, Any]:
            return {"loss": self.layer(x).mean()}

    data, _ = problem()
    loss_level = {"tasks": TASKS, "plugins": ["dwa"]}
    run = MTLTrainer(
        model=NoLosses(), args=arguments(tmp_path), train_dataset=Rows(data, 48), mtl=loss_level
    )
    with pytest.raises(InputError, match=r"'losses': \{task: scalar loss\}"):
        run.compute_loss(run.model, {"x": data.x_train[:4]})


def test_the_example_runs_and_resumes(
    monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp_path: Path
) -> None:
    """``examples/transformers_train.py``, small: 4 steps saving at 2 and 4, then resumed from
    the last checkpoint for 2 more."""
    script = Path(__file__).resolve().parents[1] / "examples" / "transformers_train.py"
    common = ["--n-train", "128", "--save-steps", "2", "--output-dir", str(tmp_path)]
    for extra in (["--steps", "4"], ["--steps", "6", "--resume"]):
        monkeypatch.setattr(sys, "argv", ["transformers_train.py", *common, *extra])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runpy.run_path(str(script), run_name="__main__")
        assert "test RMSE / σ" in capsys.readouterr().out
    assert (tmp_path / "checkpoint-6" / STATE_FILE).is_file()


if __name__ == "__main__":
    from worker_exit import run_worker

    run_worker(_worker, Path(sys.argv[1]))
