"""FSDP2 against DDP in space ``params`` on the same model: step time and peak memory, 2 processes.

Both run UPGrad on the per-task gradients of the whole trunk (space ``params``, exact), side by
side in one run: the steps alternate DDP, FSDP2, DDP, ... on the same batches, and the medians
are compared. Run from the repository root::

    python benchmarks/bench_fsdp.py             # CPU, gloo (spawns its own 2 processes)
    python benchmarks/bench_fsdp.py --quick     # a small model, a few steps
    torchrun --nproc_per_node 2 benchmarks/bench_fsdp.py --device cuda   # 2 GPUs, NCCL

Memory per process: on CUDA ``torch.cuda.max_memory_allocated`` over a step; on CPU the same
quantity from the profiler's allocation events (what torch allocated during the step, at its
peak) plus what was held before it (parameters, gradients, optimizer state), both local: a
sharded tensor counts its shard.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, few steps")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="samples per process")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per engine")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.depth, args.steps = 256, 3, 4
    return args


class Net(nn.Module):
    def __init__(self, hidden: int, depth: int, tasks: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(hidden, hidden), nn.Tanh()]
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(hidden, 8) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.encoder(x)
        return z, [head(z) for head in self.heads]


def _local_bytes(tensors: list[torch.Tensor]) -> int:
    total = 0
    for tensor in tensors:
        to_local = getattr(tensor, "to_local", None)
        local = to_local() if to_local is not None else tensor
        total += local.numel() * local.element_size()
    return total


def _held(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return _local_bytes(params) + _local_bytes(grads) + _local_bytes(states)


def _cpu_step_peak(step: Callable[[], None]) -> int:
    """Peak of torch's CPU allocations during ``step``, above what was allocated before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.nbytes() != 0
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def run(args: argparse.Namespace) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from mtlhooks import MTL
    from mtlhooks.integrations import ddp as mtl_ddp

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, rank if args.device == "cuda" else 0)
    if args.device == "cuda":
        torch.cuda.set_device(device)
    config = {"tasks": [f"t{i}" for i in range(args.tasks)], "plugins": ["upgrad"]}
    config["space"] = "params"

    ddp_model = Net(args.hidden, args.depth, args.tasks).to(device)
    ddp = DistributedDataParallel(ddp_model)
    ddp_mtl = MTL(config, shared=ddp_model.encoder)
    ddp_optimizer = torch.optim.Adam(ddp_model.parameters(), lr=1e-4)

    fsdp_model = Net(args.hidden, args.depth, args.tasks).to(device)
    for layer in fsdp_model.encoder:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(fsdp_model)
    fsdp_mtl = MTL(config, shared=fsdp_model.encoder, model=fsdp_model)
    fsdp_optimizer = torch.optim.Adam(fsdp_model.parameters(), lr=1e-4)

    generator = torch.Generator().manual_seed(rank)
    batches = [
        (
            torch.randn(args.batch, args.hidden, generator=generator).to(device),
            [torch.randn(args.batch, 8, generator=generator).to(device) for _ in range(args.tasks)],
        )
        for _ in range(4)
    ]

    def losses_of(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> dict:
        return {f"t{i}": (o - y).pow(2).mean() for i, (o, y) in enumerate(zip(outputs, targets))}

    def ddp_step(index: int) -> None:
        x, targets = batches[index % len(batches)]
        with mtl_ddp.forward_context(ddp_mtl, ddp):
            _z, outputs = ddp(x)
        ddp_mtl.backward(losses_of(outputs, targets))
        ddp_optimizer.step()
        ddp_optimizer.zero_grad()

    def fsdp_step(index: int) -> None:
        x, targets = batches[index % len(batches)]
        _z, outputs = fsdp_model(x)
        fsdp_mtl.backward(losses_of(outputs, targets))
        fsdp_optimizer.step()
        fsdp_optimizer.zero_grad()

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    for i in range(2):  # warm-up (FSDP's lazy init, optimizer state)
        ddp_step(i)
        fsdp_step(i)
    times: dict[str, list[float]] = {"ddp": [], "fsdp": []}
    for i in range(args.steps):
        for name, step in (("ddp", ddp_step), ("fsdp", fsdp_step)):
            sync()
            start = time.perf_counter()
            step(i)
            sync()
            times[name].append(time.perf_counter() - start)

    peaks = {}
    for name, step, model, optimizer in (
        ("ddp", ddp_step, ddp_model, ddp_optimizer),
        ("fsdp", fsdp_step, fsdp_model, fsdp_optimizer),
    ):
        sync()
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step(0)
            peaks[name] = torch.cuda.max_memory_allocated()
        else:
            held = _held(model, optimizer)
            peaks[name] = held + _cpu_step_peak(lambda: step(0))  # noqa: B023
    if rank == 0:
        parameters = sum(p.numel() for p in ddp_model.parameters())
        print(
            f"{world} processes, {args.device}, {parameters / 1e6:.2f} M parameters, "
            f"T={args.tasks}, {args.batch} samples per process, UPGrad in space params"
        )
        print("| engine | step time (median) | peak memory per process |")
        print("| --- | --- | --- |")
        for name, label in (("ddp", "DDP"), ("fsdp", "FSDP2")):
            median = statistics.median(times[name])
            print(f"| {label} | {median * 1e3:.1f} ms | {peaks[name] / 2**20:.1f} MiB |")
        ratio_time = statistics.median(times["fsdp"]) / statistics.median(times["ddp"])
        print(f"FSDP2 / DDP: time {ratio_time:.2f}x, memory {peaks['fsdp'] / peaks['ddp']:.2f}x")
    for mtl in (ddp_mtl, fsdp_mtl):
        mtl.close()


def _spawn(argv: list[str]) -> int:
    """Two processes with the environment torchrun gives them, on a free port."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processes = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
        }
        processes.append(subprocess.Popen([sys.executable, __file__, *argv], env=env, cwd=ROOT))
    return max(p.wait() for p in processes)


def main(argv: list[str]) -> int:
    if "RANK" not in os.environ:
        return _spawn(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        run(args)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
