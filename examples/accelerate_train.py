"""Multi-task training with mtlhooks and Hugging Face Accelerate, on one or several processes.

The GradNorm-style synthetic regression of :mod:`mtlhooks.problems` (tasks whose scales differ
by orders of magnitude) trained by a shared MLP, with AvgNorm + PCGrad by default::

    python examples/accelerate_train.py                                 # one process
    torchrun --nproc_per_node 2 examples/accelerate_train.py            # two CPU processes
    accelerate launch --num_processes 2 examples/accelerate_train.py \\
        --mixed-precision fp16                                          # two GPUs

Options: ``--plugins mgda --space features``, ``--accumulation 4``, ``--config mtl.yaml``,
``--resume`` (load ``OUTPUT_DIR/checkpoint``, then train ``--steps`` more steps); ``--help``
lists them all. The script
prints the per-task test errors (relative to each task's scale) and checks that every process
holds the same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from mtlhooks.integrations.accelerate import AcceleratedMTL
from mtlhooks.integrations.ddp import exit_together, parameter_divergence
from mtlhooks.problems import MultiTaskMLP, make_regression, regression_errors


class Net(MultiTaskMLP):
    """The problems' MLP, returning ``z`` in float32: under mixed precision Accelerate converts
    the model's half-precision outputs to float32 copies, and ``features=`` must be the tensor
    the heads consumed."""

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.encoder(x)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        return z, {task: head(z) for task, head in self.heads.items()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per process")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-steps per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--plugins", nargs="*", default=["avgnorm", "pcgrad"])
    parser.add_argument(
        "--space", default="auto", choices=["auto", "none", "features", "last_shared", "params"]
    )
    parser.add_argument("--sync", default="exact", choices=["exact", "gramian"])
    parser.add_argument("--config", type=Path, help="an mtlhooks config file (overrides the above)")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--n-train", type=int, default=4096)
    parser.add_argument("--in-dim", type=int, default=250)
    parser.add_argument("--out-dim", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--sigmas", type=float, nargs="*", default=[1.0, 10.0, 100.0])
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/accelerate_train"))
    parser.add_argument("--resume", action="store_true", help="load OUTPUT_DIR/checkpoint first")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even with GPUs")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    accelerator = Accelerator(
        cpu=args.cpu or not torch.cuda.is_available(),
        gradient_accumulation_steps=args.accumulation,
        mixed_precision=args.mixed_precision,
        log_with=None,  # e.g. "tensorboard" with project_dir=...: gradstats records go there
    )
    set_seed(args.seed)
    data = make_regression(
        sigmas=args.sigmas,
        n_train=args.n_train,
        n_test=1024,
        in_dim=args.in_dim,
        out_dim=args.out_dim,
        seed=args.seed,
    )
    tasks = data.task_names
    model = Net(data.x_train.shape[1], args.hidden, data.task_out_dims, depth=3, seed=args.seed)

    config = args.config or {
        "tasks": list(tasks),
        "plugins": [*args.plugins, {"name": "gradstats", "every": args.log_every}],
        "space": args.space,
        "sync": args.sync,
        "seed": args.seed,
    }
    # Built after the Accelerator, so it finds the processes' group; registers its state for
    # save_state / load_state and attaches gradstats to the accelerator's trackers.
    mtl = AcceleratedMTL(accelerator, config, shared=model.encoder)
    optimizer = torch.optim.Adam([*model.parameters(), *mtl.parameters()], lr=args.lr)
    dataset = TensorDataset(data.x_train, *(data.y_train[t] for t in tasks))
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.init_trackers("accelerate_train", config=vars(args) | {"config": str(config)})

    checkpoint = args.output_dir / "checkpoint"
    if args.resume:
        accelerator.load_state(str(checkpoint))
    accelerator.print(mtl.describe())
    accelerator.print(
        f"{accelerator.num_processes} process(es), {accelerator.distributed_type.value}, "
        f"mixed precision {accelerator.mixed_precision}, accumulation {args.accumulation}"
    )

    step, running = 0, torch.zeros(len(tasks))
    while step < args.steps:
        for x, *targets in loader:
            with mtl.accumulate(model):  # accelerator.accumulate + no_sync where needed
                z, outputs = model(x)
                losses = data.losses(outputs, dict(zip(tasks, targets)))
                # divides by the accumulation steps; z only where the config's space uses it
                report = mtl.backward(losses, features=z if mtl.takes_features else None)
                optimizer.step()
                optimizer.zero_grad()
            running += torch.stack([loss.detach().float().cpu() for loss in losses.values()])
            if not accelerator.sync_gradients:
                continue
            step += 1
            if step % args.log_every == 0 or step == args.steps:
                # This process's losses, averaged over the micro-steps of the optimizer step.
                mean = running / args.accumulation
                values = {t: round(float(v), 4) for t, v in zip(tasks, mean)}
                weights = None if report.weights is None else report.weights.tolist()
                accelerator.print(f"step {step:5d}  losses {values}  weights {weights}")
                accelerator.log({f"loss/{t}": v for t, v in values.items()}, step=step)
            running.zero_()
            if step == args.steps:
                break

    accelerator.wait_for_everyone()
    accelerator.save_state(str(checkpoint))
    divergence = parameter_divergence(accelerator.unwrap_model(model))
    if accelerator.is_main_process:
        # Evaluate a float32 CPU copy: the test set lives on the CPU.
        trained = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        errors = regression_errors(copy.deepcopy(trained).cpu().float(), data)
        print("test error / σ per task:", json.dumps({t: round(e, 4) for t, e in errors.items()}))
        print(f"replicas identical: {divergence == 0.0} (max deviation {divergence:.3g})")
    accelerator.end_training()
    # While the model and the process group are alive, not after main() returns.
    exit_together()


if __name__ == "__main__":
    main()
