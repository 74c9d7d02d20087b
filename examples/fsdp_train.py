"""Exact gradient surgery on a model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

The GradNorm-style synthetic regression of :mod:`mtlhooks.problems` trained by a shared MLP with
AvgNorm + UPGrad in space ``params`` (the per-task gradients of every shared parameter). Each
process holds 1/R of every parameter, of its gradients and of the per-task gradients; the result
equals one process on the global batch (``pytest -m distributed`` checks it)::

    torchrun --nproc_per_node 2 examples/fsdp_train.py                      # two CPU processes
    torchrun --nproc_per_node 8 examples/fsdp_train.py --mixed-precision bf16   # eight GPUs

Options: ``--plugins pcgrad --space features``, ``--accumulation 4``, ``--resume`` (load
``OUTPUT_DIR/checkpoint`` with torch.distributed.checkpoint, then train ``--steps`` more);
``--help`` lists them all. It prints the per-task test errors (relative to each task's scale)
and how much of the model each process holds.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from mtlhooks import MTL
from mtlhooks.integrations.ddp import exit_together
from mtlhooks.problems import MultiTaskMLP, make_regression, regression_errors


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per process")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-steps per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--plugins", nargs="*", default=["avgnorm", "upgrad"])
    parser.add_argument(
        "--space", default="params", choices=["none", "features", "last_shared", "params"]
    )
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--n-train", type=int, default=4096)
    parser.add_argument("--in-dim", type=int, default=250)
    parser.add_argument("--out-dim", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--sigmas", type=float, nargs="*", default=[1.0, 10.0, 100.0])
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/fsdp_train"))
    parser.add_argument("--resume", action="store_true", help="load OUTPUT_DIR/checkpoint first")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    data = make_regression(
        sigmas=args.sigmas,
        n_train=args.n_train,
        n_test=1024,
        in_dim=args.in_dim,
        out_dim=args.out_dim,
        seed=args.seed,
    )
    tasks = data.task_names
    model = MultiTaskMLP(
        data.x_train.shape[1], args.hidden, data.task_out_dims, depth=3, seed=args.seed
    ).to(device)
    # Shard each trunk layer, then the root (which takes the heads): the usual FSDP2 recipe.
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if args.mixed_precision == "bf16" else None,
        reduce_dtype=torch.float32 if args.mixed_precision == "bf16" else None,
    )
    for layer in model.encoder:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)

    config = {
        "tasks": list(tasks),
        "plugins": [*args.plugins, {"name": "gradstats", "every": args.log_every}],
        "space": args.space,
        "seed": args.seed,
    }
    # After fully_shard (or before: the pipeline follows the parameters it replaces), with the
    # whole model: every gradient FSDP writes lands on its sharded parameters.
    mtl = MTL(config, shared=model.encoder, model=model)
    optimizer = torch.optim.Adam([*model.parameters(), *mtl.parameters()], lr=args.lr)

    checkpoint = args.output_dir / "checkpoint"
    if args.resume:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(checkpoint))
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
        # The pipeline's state is the same on every process: one file.
        mtl.load_state_dict(torch.load(checkpoint / "mtl.pt", weights_only=False))
    if rank == 0:
        print(mtl.describe())
        held = sum(p.to_local().numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        print(f"{world} process(es), {device.type}; each holds {held} of {total} parameters")

    generator = torch.Generator().manual_seed(args.seed)
    micro = args.batch_size // args.accumulation
    for step in range(1, args.steps + 1):
        # The same global batch on every process; each takes its own rows.
        rows = torch.randint(0, len(data.x_train), (world * args.batch_size,), generator=generator)
        mine = rows[rank * args.batch_size : (rank + 1) * args.batch_size]
        for k in range(args.accumulation):
            part = mine[k * micro : (k + 1) * micro]
            x = data.x_train[part].to(device)
            targets = {t: data.y_train[t][part].to(device) for t in tasks}
            _z, outputs = model(x)
            losses = {
                t: loss / args.accumulation for t, loss in data.losses(outputs, targets).items()
            }
            report = mtl.backward(losses, sync=k == args.accumulation - 1)
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            values = {t: round(float(v), 4) for t, v in zip(tasks, report.losses)}
            weights = (
                None if report.weights is None else [round(w, 4) for w in report.weights.tolist()]
            )
            print(f"step {step:5d}  losses {values}  weights {weights}")

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(checkpoint))
    if rank == 0:
        torch.save(mtl.state_dict(), checkpoint / "mtl.pt")
    # Gather the full parameters (a collective) for evaluation on the main process.
    full = {name: p.full_tensor().detach() for name, p in model.named_parameters()}
    if rank == 0:
        evaluated = MultiTaskMLP(
            data.x_train.shape[1], args.hidden, data.task_out_dims, depth=3, seed=args.seed
        )
        evaluated.load_state_dict({name: value.float().cpu() for name, value in full.items()})
        errors = regression_errors(evaluated, data)
        print("test error / σ per task:", json.dumps({t: round(e, 4) for t, e in errors.items()}))
        if cuda:
            print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    mtl.close()
    # While the model and the process group are alive, not after main() returns.
    exit_together()


if __name__ == "__main__":
    main()
