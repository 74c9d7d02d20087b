"""The functional API of gradient aggregation: Gramian → per-task weights, without the hook host.

Each function maps the T×T Gramian ``G = J Jᵀ`` of the task gradients ``gᵢ`` (rows of J) to
weights ``α`` such that the update is ``d = Σᵢ αᵢ gᵢ = Jᵀα`` (conventions:
:mod:`mtlhooks.method`). The functions live in their methods' files (``mtlhooks/plugins/<name>.py``,
next to the plugin class and the declaration of the method's properties); this module re-exports
them, so ``from mtlhooks.functional import upgrad`` is the stable way to call one.

:data:`METHODS` gathers every declaration (:class:`~mtlhooks.method.MethodSpec`) of the built-in
plugins, found like any plugin (:mod:`mtlhooks.registry`), plus the trivial ``mean`` and ``sum``.
It drives the property tests and the generated table ``docs/aggregator-properties.md``
(:func:`property_table_markdown`): a method added as a new file with its entry point appears in
both without a change here.

All functions return finite weights for every finite Gramian, or raise
:class:`~mtlhooks.errors.SolverError` where the method is undefined (documented per function).
A non-finite Gramian yields non-finite weights (so a GradScaler skips the step), never an error.
"""

from __future__ import annotations

from mtlhooks import registry
from mtlhooks.method import TRIVIAL_METHODS, MethodSpec, Property, Variant, mean, sum
from mtlhooks.plugins.aligned_mtl import aligned_mtl
from mtlhooks.plugins.cagrad import cagrad
from mtlhooks.plugins.config import config
from mtlhooks.plugins.cr_mogm import cr_mogm
from mtlhooks.plugins.dualproj import dualproj
from mtlhooks.plugins.fairgrad import fairgrad
from mtlhooks.plugins.graddrop import graddrop
from mtlhooks.plugins.gradvac import gradvac
from mtlhooks.plugins.imgrad import imgrad
from mtlhooks.plugins.imtl_g import imtl_g
from mtlhooks.plugins.krum import krum
from mtlhooks.plugins.mgda import mgda
from mtlhooks.plugins.moco import moco
from mtlhooks.plugins.modo import modo
from mtlhooks.plugins.nash_mtl import nash_mtl
from mtlhooks.plugins.pcd import PCDState, pcd
from mtlhooks.plugins.pcgrad import pcgrad, pcgrad_from_orders
from mtlhooks.plugins.sdmgrad import sdmgrad
from mtlhooks.plugins.trimmed_mean import trimmed_mean
from mtlhooks.plugins.upgrad import upgrad

__all__ = [
    "METHODS",
    "MethodSpec",
    "PCDState",
    "Property",
    "Variant",
    "aligned_mtl",
    "cagrad",
    "config",
    "cr_mogm",
    "declared_methods",
    "dualproj",
    "fairgrad",
    "graddrop",
    "gradvac",
    "imgrad",
    "imtl_g",
    "krum",
    "mean",
    "mgda",
    "moco",
    "modo",
    "nash_mtl",
    "pcd",
    "pcgrad",
    "pcgrad_from_orders",
    "property_table_markdown",
    "sdmgrad",
    "sum",
    "trimmed_mean",
    "upgrad",
]


def declared_methods(*, builtin_only: bool = True) -> dict[str, MethodSpec]:
    """The declaration of every plugin that declares a method (``Plugin.method``), by plugin
    name, after the trivial ``mean`` and ``sum``; ``builtin_only=False`` adds the methods of
    installed third-party plugins."""
    found = dict(TRIVIAL_METHODS)
    infos = registry.builtin_plugins() if builtin_only else registry.available_plugins()
    for info in infos:
        if info.cls.method is not None:
            found[info.name] = info.cls.method
    return found


METHODS: dict[str, MethodSpec] = declared_methods()
"""Every built-in method's declaration, by name (see :func:`declared_methods`)."""


def property_table_markdown() -> str:
    """Render :data:`METHODS` as a Markdown table (for the generated docs)."""
    columns = [
        ("non-conflicting", Property.NON_CONFLICTING),
        ("scale-invariant", Property.SCALE_INVARIANT),
        ("perm.-equivariant", Property.PERMUTATION_EQUIVARIANT),
        ("nonnegative", Property.NONNEGATIVE),
    ]
    header = ["method", "paper", "input", *(name for name, _ in columns), "random", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, spec in METHODS.items():
        marks = []
        for _, prop in columns:
            mark = "✔" if prop in spec.properties else "✘"
            extra = [v.label for v in spec.variants if prop in v.properties - spec.properties]
            marks.append(f"{mark} (✔ for {', '.join(extra)})" if extra else mark)
        notes = []
        if spec.scale_exponent is not None:
            notes.append(f"weights(cG) = c^{spec.scale_exponent:g}·weights(G)")
        if spec.notes:
            notes.append(spec.notes)
        if spec.may_raise:
            notes.append(f"raises SolverError {spec.may_raise}")
        row = [
            f"`{name}`",
            spec.paper,
            spec.input,
            *marks,
            "yes" if spec.random else "no",
            "; ".join(notes),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
