"""The Gramian of the shared parameters' per-task gradients, layer by layer, without the T×P
matrix.

For a linear layer ``y = x Wᵀ + b`` seen by N rows (batch × any other leading dims), task i's
gradients are ``∇_W Lᵢ = Dᵢᵀ A`` and ``∇_b Lᵢ = Dᵢᵀ 1`` with A (N×in) the layer's input and
Dᵢ (N×out) the gradient of Lᵢ w.r.t. the layer's output. Hence

    ⟨∇_W Lᵢ, ∇_W Lⱼ⟩ = ⟨Dᵢ, (A Aᵀ) Dⱼ⟩        ⟨∇_b Lᵢ, ∇_b Lⱼ⟩ = (1ᵀDᵢ)(1ᵀDⱼ)ᵀ

so per task only Dᵢ is needed: T backward passes that compute activation gradients but no
weight gradients, then one weighted backward writes ``.grad`` as usual. Memory: T·N·out per
layer instead of T·out·in; when N is large the layer's T×out×in gradients are formed
transiently instead (whichever costs fewer operations), still one layer at a time. The idea is
that of TorchJD's "autogram" engine (Quinton & Rey, 2024); this implementation is ours.

Parameters outside ``nn.Linear`` layers (norms, convolutions, ...) have their per-task
gradients taken and held as usual (T copies of those parameters only).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mtlhooks.graph import graph_nodes, unreached


@dataclass
class _Layer:
    module: nn.Linear
    weight_name: str
    bias_name: str | None
    records: list[tuple[Tensor, Tensor]] = field(default_factory=list)


def _remove_handles(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class LayerTaps:
    """Forward hooks on the shared ``nn.Linear`` layers: they keep each call's input and output
    (references only: autograd saves the input for the backward anyway)."""

    def __init__(self, shared: nn.Module, names: dict[int, str]) -> None:
        self.layers: list[_Layer] = []
        self._handles: list[RemovableHandle] = []
        for module in shared.modules():
            if not isinstance(module, nn.Linear) or id(module.weight) not in names:
                continue
            if not module.weight.requires_grad:
                continue
            bias = module.bias
            bias_name = names.get(id(bias)) if bias is not None and bias.requires_grad else None
            layer = _Layer(module, names[id(module.weight)], bias_name)
            self.layers.append(layer)
            self._handles.append(module.register_forward_hook(self._hook(layer)))
        # An MTL dropped without close() must not leave hooks (and the graphs they keep) on the
        # user's model: remove them when these taps are collected.
        weakref.finalize(self, _remove_handles, self._handles)

    @staticmethod
    def _hook(layer: _Layer):  # type: ignore[no-untyped-def]
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            # Evaluation forwards (eval mode or no grad) are never part of a training step.
            if module.training and torch.is_grad_enabled() and output.requires_grad:
                layer.records.append((inputs[0], output))

        return record

    def covered(self) -> set[int]:
        """``id`` of every parameter these taps account for."""
        ids = set()
        for layer in self.layers:
            ids.add(id(layer.module.weight))
            if layer.bias_name is not None:
                ids.add(id(layer.module.bias))
        return ids

    def take(self) -> list[tuple[_Layer, list[tuple[Tensor, Tensor]]]]:
        """The records of the forward passes since the last call, and forget them."""
        taken = [(layer, layer.records) for layer in self.layers]
        for layer in self.layers:
            layer.records = []
        return taken

    def clear(self) -> None:
        for layer in self.layers:
            layer.records = []

    def pending_rows(self) -> int:
        """Σ over tapped layers of rows × out features recorded so far (memory estimate)."""
        return sum(output.numel() for layer in self.layers for _, output in layer.records)

    def remove(self) -> None:
        _remove_handles(self._handles)


def layer_gramians(layer: _Layer, inputs: Tensor, deltas: Tensor) -> list[tuple[str, Tensor]]:
    """Gramians of one linear layer's weight (and bias) from its input rows ``inputs`` (N×in)
    and the per-task output gradients ``deltas`` (T×N×out)."""
    count, rows, width_out = deltas.shape
    width_in = inputs.shape[1]
    dtype = torch.promote_types(deltas.dtype, torch.float32)
    inputs, deltas = inputs.to(dtype), deltas.to(dtype)
    kernel_cost = count * rows * rows * width_out + rows * rows * width_in
    direct_cost = count * rows * width_out * width_in + count * count * width_out * width_in
    if kernel_cost <= direct_cost:
        kernel = inputs @ inputs.T
        mixed = torch.matmul(kernel, deltas)  # T×N×out: K Dⱼ for every task j
        weight = deltas.reshape(count, -1) @ mixed.reshape(count, -1).T
    else:
        gradients = torch.matmul(deltas.transpose(1, 2), inputs).reshape(count, -1)
        weight = gradients @ gradients.T
    out = [(layer.weight_name, weight)]
    if layer.bias_name is not None:
        sums = deltas.sum(dim=1)
        out.append((layer.bias_name, sums @ sums.T))
    return out


def collect(
    taps: LayerTaps,
    losses: Sequence[Tensor],
    others: Sequence[tuple[str, Tensor]],
    seeds: Sequence[Tensor | None],
) -> tuple[list[str], list[Tensor], list[Tensor]] | None:
    """Per-block Gramians of the tapped layers plus the per-task gradient blocks of ``others``.

    Runs one backward per task to the tapped layers' outputs (and ``others``), keeping the
    graph. Returns (names, block Gramians, blocks of ``others``) where the Gramians list covers
    tapped layers first, then ``others`` (whose blocks are returned for the caller to reduce);
    ``None`` when some tapped layer has no recorded call in these losses' graph (a layer this
    forward did not use, or a torch.compile'd forward whose hooks ran at tracing time only):
    the caller then materialises the per-task gradients, which is exact in every case.
    """
    # Keep the calls of this step's forward: records of other forwards (a second model sharing
    # the layers, a forward whose loss was never back-propagated) are not in these losses' graph.
    reachable = graph_nodes(losses)
    taken = []
    for layer, records in taps.take():
        mine = [(x, out) for x, out in records if id(out.grad_fn) in reachable]
        if not mine:
            return None
        taken.append((layer, mine))
    outputs = [output for _, records in taken for _, output in records]
    other_params = [p for _, p in others]
    count = len(losses)
    per_task: list[Sequence[Tensor | None]] = []
    for loss, seed in zip(losses, seeds):
        per_task.append(
            torch.autograd.grad(
                loss,
                outputs + other_params,
                grad_outputs=seed,
                retain_graph=True,
                allow_unused=True,
            )
        )
    # A recorded call that no task's gradient reaches, although its output is in the graph, is
    # not an ancestor of the losses as autograd sees it (a torch.compile'd forward returns such
    # copies of intermediate tensors): the recorded inputs cannot be trusted either.
    if any(all(grads[k] is None for grads in per_task) for k in range(len(outputs))):
        return None
    names: list[str] = []
    gramians: list[Tensor] = []
    position = 0
    for layer, records in taken:
        width_in, width_out = layer.module.in_features, layer.module.out_features
        inputs = torch.cat([x.detach().reshape(-1, width_in) for x, _ in records])
        rows_per_record = [output.numel() // width_out for _, output in records]
        deltas = []
        for grads in per_task:
            parts = []
            for k, (_, output) in enumerate(records):
                grad = grads[position + k]
                if grad is None:
                    grad = torch.zeros_like(output)
                parts.append(grad.reshape(rows_per_record[k], width_out))
            deltas.append(torch.cat(parts))
        position += len(records)
        for name, gramian in layer_gramians(layer, inputs, torch.stack(deltas)):
            names.append(name)
            gramians.append(gramian)
    blocks = []
    for j, (name, p) in enumerate(others):
        column = [grads[position + j] for grads in per_task]
        if all(g is None for g in column):
            raise unreached(name, losses)
        stacked = torch.stack([torch.zeros_like(p) if g is None else g for g in column])
        blocks.append(stacked.reshape(count, -1))
        names.append(name)
    return names, gramians, blocks
