"""Walking the autograd graph of the losses: its leaves, its nodes, and why a parameter is not
reached."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torch.autograd.graph import Node

from mtlhooks.errors import InputError


def graph_leaves(root: Tensor, exclude: set[int]) -> list[Tensor]:
    """Leaf tensors that ``root.backward()`` would accumulate into, except those in ``exclude``
    (by ``id``), in a deterministic order (depth-first from ``root``).

    It runs on every call of the fast path, so it is written for speed: each node is pushed
    once (nodes themselves are the members of ``seen``: each node's Python object lives as long
    as the graph), and only a node without inputs (a gradient accumulator) is asked for its
    ``variable``."""
    leaves: list[Tensor] = []
    first = root.grad_fn
    if first is None:
        return leaves
    seen: set[object] = {first, None}
    stack: list[Any] = [first]  # autograd nodes (torch types their inputs as optional)
    pop, push, add = stack.pop, stack.append, seen.add
    while stack:
        node = pop()
        inputs = node.next_functions
        if inputs:
            for child, _ in reversed(inputs):
                if child not in seen:
                    add(child)
                    push(child)
            continue
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in exclude:
            leaves.append(variable)
    return leaves


def task_leaves(roots: Sequence[Tensor], exclude: set[int]) -> list[list[Tensor]]:
    """For each root, the leaves ``graph_leaves(root, exclude)`` finds (as a set), from one
    walk of the union of their graphs: each node's leaves are gathered once and shared by
    every root above it, so T losses over one trunk cost one walk of the trunk, not T."""
    below: dict[int, tuple[Tensor, ...]] = {}
    for root in roots:
        stack: list[tuple[object, bool]] = [(root.grad_fn, False)]
        while stack:
            node, expanded = stack.pop()
            if node is None or id(node) in below:
                continue
            variable = getattr(node, "variable", None)
            if variable is not None:
                below[id(node)] = () if id(variable) in exclude else (variable,)
                continue
            children = [child for child, _ in node.next_functions if child is not None]  # type: ignore[attr-defined]
            if not expanded:
                # A DAG: the node's children are all done before it is popped expanded.
                stack.append((node, True))
                stack.extend((child, False) for child in reversed(children))
                continue
            found: dict[int, Tensor] = {}
            for child in children:
                for leaf in below[id(child)]:
                    found.setdefault(id(leaf), leaf)
            below[id(node)] = tuple(found.values())
    return [[] if root.grad_fn is None else list(below[id(root.grad_fn)]) for root in roots]


def graph_nodes(roots: Sequence[Tensor]) -> set[int]:
    """``id`` of every autograd node reachable from ``roots``."""
    return {id(node) for node in _nodes(roots)}


def _nodes(roots: Sequence[Tensor]) -> list[Node]:
    seen: set[int] = set()
    found: list[Node] = []
    stack = [root.grad_fn for root in roots]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        found.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


_REENTRANT_CHECKPOINT = "CheckpointFunctionBackward"


def unreached(name: str, losses: Sequence[Tensor]) -> InputError:
    """The error for a shared parameter that no task's gradient reaches, naming the cause when
    it is a reentrant activation checkpoint (whose parameters ``autograd.grad`` cannot see)."""
    if any(type(node).__name__ == _REENTRANT_CHECKPOINT for node in _nodes(losses)):
        return InputError(
            f"shared parameter {name!r} is not reached by the per-task gradients: the losses' "
            "graph holds a reentrant activation checkpoint (torch.utils.checkpoint.checkpoint "
            "with use_reentrant=True), whose parameters torch.autograd.grad cannot see into. "
            "Checkpoint with use_reentrant=False (for Hugging Face models, "
            "gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            "{'use_reentrant': False})), or use space 'features'"
        )
    return InputError(
        f"shared parameter {name!r} receives no gradient from any task: remove it from "
        "shared= (or set requires_grad=False), or check the forward pass"
    )
