"""Multi-task training with mtlhooks inside the Hugging Face ``Trainer`` (``MTLTrainer``).

The model's forward returns per-task losses (``{"losses": {task: loss}}``), the contract of
``MTLTrainer``; the data is the GradNorm-style synthetic regression of :mod:`mtlhooks.problems`::

    python examples/transformers_train.py                          # one CPU process
    torchrun --nproc_per_node 2 examples/transformers_train.py     # two processes (DDP)
    python examples/transformers_train.py --accumulation 4 --resume

It prints the pipeline, then each task's test error relative to its scale.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn
from transformers import TrainingArguments

from mtlhooks.integrations.transformers import MTLTrainer
from mtlhooks.problems import MultiTaskMLP, make_regression, regression_errors


class TaskLosses(nn.Module):
    """Wraps the problems' MLP: ``forward(x, targets)`` returns the per-task losses."""

    def __init__(self, mlp: MultiTaskMLP) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
        _, outputs = self.mlp(x)
        columns = targets.split([outputs[t].shape[1] for t in self.mlp.heads], dim=1)
        losses = {
            task: nn.functional.mse_loss(outputs[task], y)
            for task, y in zip(self.mlp.heads, columns)
        }
        return {"losses": losses}


class Rows(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "targets": self.y[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--plugins", nargs="*", default=["avgnorm", "pcgrad"])
    parser.add_argument("--space", default="params")
    parser.add_argument("--output-dir", default="runs/transformers_train")
    parser.add_argument("--save-steps", type=int, default=100)
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint")
    parser.add_argument("--n-train", type=int, default=2048)
    args = parser.parse_args()

    data = make_regression(sigmas=(1.0, 10.0, 100.0), n_train=args.n_train, n_test=256, seed=0)
    mlp = MultiTaskMLP(data.x_train.shape[1], 64, data.task_out_dims, depth=3, seed=0)
    targets = torch.cat([data.y_train[t] for t in data.task_names], dim=1)
    trainer = MTLTrainer(
        model=TaskLosses(mlp),
        args=TrainingArguments(
            output_dir=args.output_dir,
            use_cpu=True,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.accumulation,
            learning_rate=1e-3,
            save_strategy="steps",
            save_steps=args.save_steps,
            logging_steps=50,
            report_to="none",
            disable_tqdm=True,
        ),
        train_dataset=Rows(data.x_train, targets),
        mtl={"tasks": data.task_names, "space": args.space, "plugins": args.plugins},
        mtl_shared=mlp.encoder,
        log_gradstats=False,
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    if trainer.is_world_process_zero():
        print(trainer.mtl.describe())
        errors = regression_errors(mlp, data)
        print("test RMSE / σ:", {task: round(value, 3) for task, value in errors.items()})


if __name__ == "__main__":
    main()
