"""The ``mtlhooks`` command: ``plugins``, ``validate``, ``schema``, ``demo``, ``bench``, ``plot``
and ``study``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from mtlhooks import registry
from mtlhooks.config import config_json_schema, load_config
from mtlhooks.errors import MTLError


def plugin_rows() -> list[dict[str, Any]]:
    """One entry per plugin: name, family, spaces, summary, source and config fields."""
    rows = []
    for info in registry.available_plugins():
        fields = []
        for field_name, field in info.config_model.model_fields.items():
            default = field.get_default(call_default_factory=True)
            fields.append(
                {
                    "name": field_name,
                    "type": str(field.annotation).replace("typing.", ""),
                    "default": default
                    if isinstance(default, (int, float, str, bool)) or default is None
                    else repr(default),
                    "description": field.description or "",
                }
            )
        rows.append(
            {
                "name": info.name,
                "family": info.family.value,
                "spaces": [s.value for s in info.spaces],
                "summary": info.summary,
                "source": info.source,
                "fields": fields,
            }
        )
    return rows


def _cmd_plugins(args: argparse.Namespace) -> int:
    rows = plugin_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        spaces = ",".join(row["spaces"]) or "-"
        print(f"{row['name']:<12} {row['family']:<15} {spaces:<28} {row['summary']}")
        for field in row["fields"]:
            print(f"{'':<14}{field['name']} = {field['default']!r}: {field['description']}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except MTLError as error:
        print(f"invalid: {error}", file=sys.stderr)
        return 1
    names = ", ".join(p.name for p in config.plugins) or "no plugin"
    print(f"valid: tasks {list(config.tasks)}, plugins: {names}, space: {config.space}")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(config_json_schema(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mtlhooks.demo import format_table, run_demo

    results = run_demo(
        steps=args.steps,
        optimizer=args.optimizer,
        lr=args.lr,
        seed=args.seed,
        progress=not args.no_progress,
    )
    if args.json:
        print(json.dumps([r.__dict__ | {"mean_error": r.mean_error} for r in results], indent=2))
    else:
        print("\nTest error per task, relative to the task's scale (lower is better):\n")
        print(format_table(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtlhooks", description="Hook-based middleware for multi-task training loops."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    plugins = commands.add_parser("plugins", help="list the available plugins")
    plugins.add_argument("--json", action="store_true", help="print a JSON list")
    plugins.set_defaults(run=_cmd_plugins)

    validate = commands.add_parser("validate", help="check a config file (YAML, TOML, JSON)")
    validate.add_argument("file")
    validate.set_defaults(run=_cmd_validate)

    schema = commands.add_parser("schema", help="print the JSON schema of config files")
    schema.set_defaults(run=_cmd_schema)

    demo = commands.add_parser("demo", help="train several configurations on a built-in problem")
    demo.add_argument("--steps", type=int, default=1500, help="optimizer steps per configuration")
    demo.add_argument("--optimizer", choices=["sgd", "adam"], default="adam")
    demo.add_argument("--lr", type=float, default=None, help="default: 3e-3 (adam), 1e-6 (sgd)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="print the results as JSON")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(run=_cmd_demo)

    from mtlhooks import bench as bench_command
    from mtlhooks import plot as plot_command
    from mtlhooks import studies

    bench = commands.add_parser("bench", help="measure step-time ratios against a plain loop")
    bench_command.add_arguments(bench)
    bench.set_defaults(run=bench_command.main)

    plot = commands.add_parser(
        "plot", help="draw a gradstats JSONL run, or methods on the two-objective toy"
    )
    plot_command.add_arguments(plot)
    plot.set_defaults(run=plot_command.run)

    study = commands.add_parser("study", help="reproduce a claim of the seed papers")
    studies.add_arguments(study)
    study.set_defaults(run=studies.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except MTLError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
