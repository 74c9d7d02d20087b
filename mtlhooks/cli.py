"""The ``mtlhooks`` command: ``plugins``, ``validate``, ``schema``, ``demo``, ``bench``, ``plot``
and ``study``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from pydantic_core import to_jsonable_python

from mtlhooks import registry
from mtlhooks.config import MTLConfig, config_json_schema, load_config
from mtlhooks.errors import MTLError
from mtlhooks.plugin import Space
from mtlhooks.progress import terminal_width


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def seed(text: str) -> int:
    """An argparse type: a seed of ``torch.Generator`` (0 ≤ seed < 2**64)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {value}")
    return value


def _json_type(schema: dict[str, Any]) -> str | list[str] | None:
    """The JSON-schema type of a field's schema: a name, or a list of names for a union."""
    if "type" in schema:
        kind: str | list[str] = schema["type"]
        return kind
    if "anyOf" in schema:
        names: list[str] = []
        for member in schema["anyOf"]:
            found = _json_type(member)
            for name in [found] if isinstance(found, str) else found or []:
                if name not in names:
                    names.append(name)
        return names
    if "const" in schema or "enum" in schema:
        values = schema.get("enum", [schema.get("const")])
        kinds = {"string" if isinstance(v, str) else "number" for v in values}
        return kinds.pop() if len(kinds) == 1 else sorted(kinds)
    return None


def plugin_rows() -> list[dict[str, Any]]:
    """One entry per plugin: name, family, spaces, summary, source and config fields. Each
    field has its JSON-schema ``type`` (a name such as ``"number"``, or a list for a union),
    its full JSON ``schema`` (bounds, enums), whether it is ``required``, and its ``default``
    as a JSON value (``null`` for a required field)."""
    rows = []
    for info in registry.available_plugins():
        properties = info.config_model.model_json_schema(mode="serialization").get("properties", {})
        fields = []
        for field_name, field in info.config_model.model_fields.items():
            schema = {
                key: value
                for key, value in properties.get(field_name, {}).items()
                if key not in ("title", "description", "default")
            }
            required = field.is_required()
            default = None if required else field.get_default(call_default_factory=True)
            fields.append(
                {
                    "name": field_name,
                    "type": _json_type(schema),
                    "schema": schema,
                    "required": required,
                    "default": to_jsonable_python(default),
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
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    width = max(terminal_width(sys.stdout), 60)
    for row in rows:
        spaces = ", ".join(row["spaces"]) or "no gradients"
        print(f"{row['name']}  ({row['family']}; {spaces})")
        for line in textwrap.wrap(row["summary"], width - 4):
            print(f"    {line}")
        for field in row["fields"]:
            kind = field["type"]
            kind = " | ".join(kind) if isinstance(kind, list) else kind or "any"
            if "enum" in field["schema"]:
                kind = "one of " + ", ".join(json.dumps(v) for v in field["schema"]["enum"])
            value = "(required)" if field["required"] else json.dumps(field["default"])
            text = f"{field['name']} = {value} ({kind}): {field['description']}"
            wrapped = textwrap.wrap(text, width - 6, subsequent_indent="    ")
            for line in wrapped:
                print(f"      {line}")
    return 0


def _space_lines(config: MTLConfig) -> list[str]:
    """What ``space`` resolves to for these plugins, and whether that depends on the model."""
    needs = {
        Space.PARAMS: "MTL needs shared=",
        Space.LAST_SHARED: "MTL needs last_shared= or a shared= module",
        Space.FEATURES: "backward() needs features=z",
        Space.NONE: "one weighted backward, the cost of a plain step",
    }
    if config.space != "auto":
        return [f"space: {config.space} (set in the config; {needs[Space(config.space)]})"]
    users = config.gradient_plugins()
    if not users:
        return ["space: auto → none for any model: no plugin reads per-task gradients"]
    cases = {
        "given shared= (a module)": (True, True),
        "given last_shared= alone": (False, True),
        "given neither": (False, False),
    }
    conditions: dict[str, list[str]] = {}
    for case, (shared, last_shared) in cases.items():
        try:
            space = config.resolve_space(shared=shared, last_shared=last_shared).value
        except MTLError:
            space = "an error"
        conditions.setdefault(space, []).append(case)
    voters = [e for e in users if e.info.family.value != "observer"] or users
    firsts = {e.name: e.info.spaces[0].value for e in voters}
    if len(set(firsts.values())) == 1:
        why = f"the first choice of {', '.join(firsts)}"
    else:
        listed = ", ".join(f"{name} {space}" for name, space in firsts.items())
        why = f"first choices differ ({listed}): the most exact space all support"
    if len(voters) < len(users):
        why += " (observers do not vote)"
    if len(conditions) == 1:
        (space,) = conditions
        supported = ", ".join(s.value for s in config.common_spaces())
        return [
            f"space: auto → {space} for any model: the plugins support only {supported} "
            f"({needs[Space(space)]})"
        ]
    told = [f"{space} {' or '.join(cases)}" for space, cases in conditions.items()]
    lines = [f"space: auto → {'; '.join(told)}", f"  why: {why}"]
    if "features" in conditions:
        lines.append(f"  in space features, {needs[Space.FEATURES]}")
    return lines


def _cmd_validate(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except MTLError as error:
        print(f"invalid: {error}", file=sys.stderr)
        return 1
    names = ", ".join(p.name for p in config.plugins) or "no plugin"
    print(f"valid: tasks {list(config.tasks)}, plugins: {names}")
    for line in _space_lines(config):
        print(line)
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
    demo.add_argument(
        "--steps", type=positive_int, default=1500, help="optimizer steps per configuration"
    )
    demo.add_argument("--optimizer", choices=["sgd", "adam"], default="adam")
    demo.add_argument(
        "--lr", type=positive_float, default=None, help="default: 3e-3 (adam), 1e-6 (sgd)"
    )
    demo.add_argument("--seed", type=seed, default=0)
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


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    print(f"warning: {message}", file=sys.stderr)


SINGLE_THREADED = ("demo", "plot")
"""Commands that train tiny models: one intra-op thread is as fast as several on an idle
machine and many times faster on a busy one, where threads wait for each other's cores."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.command in SINGLE_THREADED:
            torch.set_num_threads(1)
        with warnings.catch_warnings():
            # A command's warnings are for the person at the terminal: one plain line each.
            warnings.showwarning = _show_warning
            code: int = args.run(args)
        sys.stdout.flush()
    except MTLError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader left early (`mtlhooks plugins | head`): stop quietly, as `cat` does.
        # Standard output is pointed at /dev/null so that the flush at exit does not fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a process killed by it
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
