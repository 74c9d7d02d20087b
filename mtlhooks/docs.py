"""Generated documentation: the plugin list, the hook reference, the aggregator property table,
the distributed support table.

``python -m mtlhooks.docs`` rewrites the generated parts of README.md and docs/; the test suite
fails when they are out of date, so documentation and code cannot drift apart.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

from mtlhooks import hookspecs, registry, support

ROOT = Path(__file__).resolve().parents[1]


def _default(field: object) -> str:
    from pydantic.fields import FieldInfo

    assert isinstance(field, FieldInfo)
    value = field.get_default(call_default_factory=True)
    return repr(value) if not isinstance(value, str) else f'"{value}"'


def plugin_table() -> str:
    """Markdown table of the built-in plugins, from the registry."""
    lines = [
        "| plugin | family | gradient spaces | what it does | options (default) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in registry.BUILTINS:
        info = registry.get_plugin(name)
        spaces = ", ".join(s.value for s in info.spaces) or "—"
        options = "; ".join(
            f"`{field_name}` ({_default(field)})"
            for field_name, field in info.config_model.model_fields.items()
        )
        summary = info.summary.replace("|", "\\|")
        lines.append(
            f"| `{name}` | {info.family.value} | {spaces} | {summary} | {options or '—'} |"
        )
    return "\n".join(lines)


def hook_names() -> list[str]:
    """Every hook of the contract, in pipeline order (source order of hookspecs.py)."""
    functions = [
        obj
        for name, obj in vars(hookspecs).items()
        if name.startswith("mtl_") and inspect.isfunction(obj)
    ]
    functions.sort(key=lambda f: f.__code__.co_firstlineno)
    return [f.__name__ for f in functions]


def hooks_reference() -> str:
    """Markdown reference of every hook: signature and docstring."""
    parts = [
        "# Hook reference",
        "",
        "Generated from `mtlhooks/hookspecs.py` by `python -m mtlhooks.docs`; do not edit.",
        "",
    ]
    for name in hook_names():
        function = getattr(hookspecs, name)
        signature = f"{name}{inspect.signature(function)}".replace("'", "")
        parts += [f"## `{name}`", "", "```python", signature, "```", ""]
        parts += [inspect.cleandoc(function.__doc__ or ""), ""]
    return "\n".join(parts)


def _replace_block(text: str, marker: str, content: str) -> str:
    pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", flags=re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"marker {marker!r} not found")
    return pattern.sub(lambda m: m.group(1) + content + "\n" + m.group(2), text)


def generated_files() -> dict[Path, str]:
    """The content every generated file should have."""
    readme = ROOT / "README.md"
    distributed = ROOT / "docs" / "distributed.md"
    files = {
        readme: _replace_block(readme.read_text(encoding="utf-8"), "plugins", plugin_table()),
        ROOT / "docs" / "hooks.md": hooks_reference(),
        distributed: _replace_block(
            distributed.read_text(encoding="utf-8"), "support", support.table_markdown()
        ),
    }
    try:
        from mtlhooks.functional import property_table_markdown
    except ImportError:  # pragma: no cover - the functional core is part of the package
        return files
    files[ROOT / "docs" / "aggregator-properties.md"] = (
        "# Aggregator properties\n\nGenerated from `mtlhooks.functional.METHODS` (the "
        "declarations the property tests use) by `python -m mtlhooks.docs`; do not edit.\n\n"
        + property_table_markdown()
        + "\n"
    )
    return files


def main() -> int:
    for path, content in generated_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != content:
            path.write_text(content, encoding="utf-8")
            print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
