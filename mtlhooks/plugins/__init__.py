"""Built-in plugins: one module per method, each depending on the core only.

A method is one file here. An aggregator's file holds, in this order:

1. its function(s) Gramian → weights (pure, citing the paper; conventions in
   :mod:`mtlhooks.method`), e.g. ``def mgda(gramian: Tensor) -> Tensor``;
2. the pydantic model of its options (a :class:`~mtlhooks.plugin.PluginConfig`), if any;
3. the plugin class, whose ``method = MethodSpec(function, paper, properties, ...)`` declares the
   properties the property tests check and ``docs/aggregator-properties.md`` lists, and whose
   hook (``mtl_aggregate``) calls the function on ``step.gramian()``.

Loss-scaling, norm-balancing and observer plugins are the same file without the function and the
declaration. Math shared by several methods lives once in :mod:`mtlhooks.solvers` (numerical
kernels) or :mod:`mtlhooks.weighting_utils` (loss-scaling conventions), never in another plugin.
Plugin modules never import :mod:`mtlhooks.functional` (which re-exports them).

Built-ins are found like third-party plugins: each is one line of the entry-point table
``[project.entry-points."mtlhooks.plugins"]`` in ``pyproject.toml`` (``name =
"mtlhooks.plugins.<file>:<Class>"``; run ``pip install -e .`` again afterwards). With that
line, the method is listed by ``mtlhooks plugins``, usable in configs, declared in
:data:`mtlhooks.functional.METHODS`, property-tested and documented; re-exporting its function
from :mod:`mtlhooks.functional` (one import line) makes it part of the functional API.
"""
