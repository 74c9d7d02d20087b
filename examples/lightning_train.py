"""Multi-task training with mtlhooks inside PyTorch Lightning (``MTLModule``).

The GradNorm-style synthetic regression of :mod:`mtlhooks.problems` trained by a shared MLP,
with AvgNorm + PCGrad in space ``params`` by default::

    python examples/lightning_train.py                              # one CPU process
    python examples/lightning_train.py --devices 2 --strategy ddp   # two processes
    python examples/lightning_train.py --manual --space features --plugins mgda

It prints the pipeline, then each task's test error relative to its scale.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from mtlhooks import MTL
from mtlhooks.integrations.lightning import MTLModule
from mtlhooks.problems import MultiTaskMLP, make_regression, regression_errors


class Net(MTLModule):
    def __init__(self, config: dict[str, Any], model: MultiTaskMLP, manual: bool) -> None:
        super().__init__()
        self.config = config
        self.model = model
        self.automatic_optimization = not manual

    def configure_mtl(self) -> MTL:  # Lightning calls it once the process group exists
        return MTL(self.config, shared=self.model.encoder)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, *targets = batch
        z, outputs = self.model(x)
        losses = {
            task: torch.nn.functional.mse_loss(outputs[task], y)
            for task, y in zip(self.model.heads, targets)
        }
        if self.automatic_optimization:
            return self.mtl_step(losses, features=z)  # instead of returning the summed loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.mtl_backward(losses, features=z)  # instead of self.manual_backward(loss)
        optimizer.step()
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([*self.parameters(), *self.mtl.parameters()], lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--plugins", nargs="*", default=["avgnorm", "pcgrad"])
    parser.add_argument("--space", default="params")
    parser.add_argument("--manual", action="store_true", help="manual optimisation")
    parser.add_argument("--accumulation", type=int, default=1, help="accumulate_grad_batches")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--n-train", type=int, default=2048)
    args = parser.parse_args()

    data = make_regression(sigmas=(1.0, 10.0, 100.0), n_train=args.n_train, n_test=256, seed=0)
    model = MultiTaskMLP(data.x_train.shape[1], 64, data.task_out_dims, depth=3, seed=0)
    config = {"tasks": data.task_names, "space": args.space, "plugins": args.plugins}
    rows = TensorDataset(data.x_train, *(data.y_train[t] for t in data.task_names))
    net = Net(config, model, args.manual)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        max_steps=args.steps,
        accumulate_grad_batches=1 if args.manual else args.accumulation,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on dataloader workers
        trainer.fit(net, DataLoader(rows, batch_size=args.batch_size, shuffle=True))
    if trainer.is_global_zero:
        print(net.mtl.describe())
        errors = regression_errors(model, data)
        print("test RMSE / σ:", {task: round(value, 3) for task, value in errors.items()})


if __name__ == "__main__":
    main()
