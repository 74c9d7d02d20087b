"""Where the fast path's cost goes: space ``none`` against a plain ``backward()``, step by step.

Usage: ``python benchmarks/bench_fast_path.py [--model mlp] [--tasks 4] [--rounds 800]``

Each round runs every variant below once, in a new shuffled order, on the same model and
batch, each on a step that begins with ``p.grad = None`` (or, with ``--accumulating``, with every
``.grad`` holding values, as in an accumulation micro-step); a variant's figure is a low
quantile (``--quantile``, default 0.3) of its steps' thread CPU time, which a shared machine's
interference disturbs least. The variants add one piece of what ``mtl.backward`` does at a time:

- ``plain``: ``sum(losses).backward()``;
- ``stacked``: ``torch.stack(losses).sum().backward()``, the total the direct path builds;
- ``walk``: the same, after the graph walk that records the written leaves for the rollback
  (gradients already there are held aside and added after, as on the unchecked path);
- ``unchecked``: ``mtl.backward`` with ``check_gradients: false`` (the direct path: space
  ``none``, no hook to dispatch);
- ``hooks``: the same call forced through the general path (hooks, snapshot, ``Step``);
- ``plain+check``: ``plain``, then every gradient checked for NaN/inf by hand (one sum per
  tensor, one host read): the least a checked step can cost;
- ``checked``: ``mtl.backward`` with every written gradient checked for NaN/inf (gradients
  already there are copied first, so that the checked sum can be undone).

The differences are what each piece costs in place (after a forward pass, with cold caches),
which is several times what it costs timed alone.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import torch
from torch import Tensor

from mtlhooks import MTL, bench, hostsync
from mtlhooks.graph import graph_leaves
from mtlhooks.transaction import GradWrites

Variant = Callable[[dict[str, Tensor]], object]


def variants(mtls: dict[str, MTL], params: list[Tensor], sync: bool) -> dict[str, Variant]:
    unchecked, general, checked = mtls["unchecked"], mtls["general"], mtls["auto"]

    def plain(losses: dict[str, Tensor]) -> None:
        sum(losses.values()).backward()  # type: ignore[union-attr]

    def stacked(losses: dict[str, Tensor]) -> None:
        torch.stack(list(losses.values())).sum().backward()

    def walk(losses: dict[str, Tensor]) -> None:
        total = torch.stack(list(losses.values())).sum()
        writes = GradWrites()
        writes.record(graph_leaves(total, set()), hold=True)
        total.backward()
        writes.commit()

    def plain_checked(losses: dict[str, Tensor]) -> None:
        sum(losses.values()).backward()  # type: ignore[union-attr]
        grads = [p.grad for p in params if p.grad is not None]
        assert hostsync.host_flag(hostsync.all_finite(grads))

    return {
        "plain": plain,
        "stacked": stacked,
        "walk": walk,
        "unchecked": lambda losses: unchecked.backward(losses, sync=sync),
        "hooks": lambda losses: general.backward(losses, sync=sync),
        "plain+check": plain_checked,
        "checked": lambda losses: checked.backward(losses, sync=sync),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=sorted(bench.MODELS))
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=800)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--quantile", type=float, default=0.3)
    parser.add_argument("--accumulating", action="store_true", help="steps on held gradients")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, x, targets = bench._build(args.model, args.tasks, torch.device("cpu"), False, 0)
    names = [f"t{i}" for i in range(args.tasks)]
    params = list(model.parameters())
    encoder = model.get_submodule("encoder")
    built = {
        mode: MTL(bench.case_config(names, "none", "static", mode), shared=encoder)
        for mode in ("unchecked", "auto")
    }
    built["general"] = MTL(bench.case_config(names, "none", "static", "unchecked"), shared=encoder)
    built["general"]._direct = None  # the general path: hooks, snapshot, Step
    steps = variants(built, params, sync=not args.accumulating)
    if args.accumulating:
        _, losses = bench._losses(model, x, targets)
        sum(losses).backward()  # type: ignore[union-attr]
    order = list(steps)
    times: dict[str, list[float]] = {name: [] for name in steps}
    shuffle = random.Random(0)
    for round_index in range(args.warmup + args.rounds):
        shuffle.shuffle(order)
        for name in order:
            for p in params:
                if args.accumulating:
                    assert p.grad is not None
                    p.grad.mul_(0.5)  # keep the held values bounded
                else:
                    p.grad = None
            start = time.thread_time()
            _, losses = bench._losses(model, x, targets)
            steps[name](dict(zip(names, losses)))
            if round_index >= args.warmup:
                times[name].append(time.thread_time() - start)

    def low(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[int(len(ordered) * args.quantile)]

    base = low(times["plain"])
    state = "accumulating (.grad held)" if args.accumulating else ".grad None at each step"
    print(f"{args.model}, T = {args.tasks}, {state}, {args.rounds} rounds, q = {args.quantile}")
    print(f"{'variant':<12} {'ms':>7} {'÷ plain':>8} {'+ over plain':>13}")
    for name in steps:
        value = low(times[name])
        print(
            f"{name:<12} {value * 1e3:7.3f} {value / base:7.3f}× {(value - base) * 1e6:+10.0f} µs"
        )


if __name__ == "__main__":
    main()
