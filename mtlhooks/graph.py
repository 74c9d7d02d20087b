"""Walking the autograd graph of the losses: its leaves, its nodes, and why a parameter is not
reached."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torch.autograd.graph import Node

from mtlhooks.errors import InputError


def graph_leaves(root: Tensor, exclude: set[int]) -> list[Tensor]:
    """Leaf tensors that ``root.backward()`` would accumulate into, except those in ``exclude``
    (by ``id``), in a deterministic order (depth-first from ``root``)."""
    leaves: list[Tensor] = []
    seen: set[int] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) not in exclude:
                leaves.append(variable)
            continue
        stack.extend(next_node for next_node, _ in reversed(node.next_functions))
    return leaves


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
