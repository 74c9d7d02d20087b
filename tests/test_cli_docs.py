"""The command line and the generated documentation."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys

import pytest

from mtlhooks import docs, hookspecs
from mtlhooks.cli import main

FAMILIES = {"loss_scaling", "norm_balancing", "aggregator", "observer"}


def test_plugins_json_lists_builtins_with_family_and_fields(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {row["name"]: row for row in rows}
    expected = {
        "static": "loss_scaling",
        "avgnorm": "norm_balancing",
        "pcgrad": "aggregator",
        "mgda": "aggregator",
        "gradstats": "observer",
    }
    for name, family in expected.items():
        assert by_name[name]["family"] == family
    assert all(row["family"] in FAMILIES for row in rows)
    pcgrad_fields = {f["name"]: f for f in by_name["pcgrad"]["fields"]}
    assert pcgrad_fields["reduction"]["default"] == "sum"


def test_plugins_table(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "72")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^mgda  \(aggregator; params, features, last_shared\)$", out, flags=re.M)
    assert 'target = "mean_norm" (one of "mean_norm", "sum_norm")' in out
    assert "every = 1 (integer): Record every N-th backward() call." in out
    assert max(len(line) for line in out.splitlines()) <= 72


JSON_SCHEMA_TYPES = {"string", "number", "integer", "boolean", "object", "array", "null"}


def test_plugins_json_gives_json_schema_types_and_json_defaults(capsys):
    from mtlhooks import registry

    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    fields = {(row["name"], f["name"]): f for row in rows for f in row["fields"]}
    for (plugin, name), field in fields.items():
        kinds = field["type"] if isinstance(field["type"], list) else [field["type"]]
        assert set(kinds) <= JSON_SCHEMA_TYPES, (plugin, name, field["type"])
        # The default, read back as JSON, is what the plugin's config takes by default.
        model = registry.get_plugin(plugin).config_model
        assert field["default"] == model().model_dump(mode="json")[name], (plugin, name)
    assert fields["avgnorm", "ema"]["type"] == "number"
    assert fields["avgnorm", "ema"]["schema"] == {
        "type": "number",
        "minimum": 0.0,
        "exclusiveMaximum": 1.0,
    }
    assert fields["gradstats", "every"]["type"] == "integer"
    assert fields["gradstats", "console_every"]["type"] == ["integer", "null"]
    assert fields["famo", "min_losses"]["default"] == {}  # a JSON object, not the text "{}"
    assert fields["gradstats", "jsonl"]["default"] is None
    assert fields["pcgrad", "reduction"]["schema"]["enum"] == ["sum", "mean"]


def test_a_closed_pipe_ends_the_listing_quietly():
    """`mtlhooks plugins | head` must not end in a BrokenPipeError traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mtlhooks.cli", "plugins"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader is gone before the first line is written
    err = process.stderr.read().decode()
    assert process.wait() == 141
    assert err == ""


@pytest.mark.parametrize(
    ("plugins", "expected"),
    [
        ([], "space: auto → none for any model: no plugin reads per-task gradients"),
        (["graddrop"], "space: auto → features for any model: the plugins support only features"),
        (
            ["pcgrad"],
            "space: auto → params given shared= (a module); last_shared given last_shared= "
            "alone; features given neither\n  why: the first choice of pcgrad",
        ),
        (
            ["avgnorm", "gradstats"],
            "space: auto → last_shared given shared= (a module) or given last_shared= alone; "
            "features given neither\n  why: the first choice of avgnorm (observers do not vote)",
        ),
        (
            ["avgnorm", "mgda"],
            "why: first choices differ (avgnorm last_shared, mgda params): the most exact",
        ),
    ],
)
def test_validate_says_which_space_auto_takes(tmp_path, capsys, plugins, expected):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"tasks": ["a", "b"], "plugins": plugins}))
    assert main(["validate", str(path)]) == 0
    assert expected in capsys.readouterr().out


def test_validate_names_a_forced_space_and_what_it_needs(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("tasks: [a, b]\nspace: params\nplugins: [mgda]\n")
    assert main(["validate", str(path)]) == 0
    assert "space: params (set in the config; MTL needs shared=)" in capsys.readouterr().out


def test_validate_runs_as_a_console_script(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('tasks = ["a"]\n[[plugins]]\nname = "avgnorm"\nema = 2\n')
    result = subprocess.run(
        [sys.executable, "-m", "mtlhooks.cli", "validate", str(bad)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "(avgnorm): ema: Input should be less than 1" in result.stderr


def test_schema_is_json(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["properties"]["tasks"]["type"] == "array"


def test_demo_quick_prints_a_table(capsys):
    from mtlhooks.demo import format_table, run_demo

    results = run_demo(
        configs={"equal weights": [], "mgda": ["mgda"]}, steps=20, progress=False, n_train=256
    )
    table = format_table(results)
    assert table.splitlines()[0].split()[:2] == ["config", "space"]
    assert [r.space for r in results] == ["none", "params"]
    assert all(0 < e < 100 for r in results for e in r.errors.values())


def test_generated_docs_are_current():
    stale = [
        str(path.relative_to(docs.ROOT))
        for path, content in docs.generated_files().items()
        if not path.exists() or path.read_text(encoding="utf-8") != content
    ]
    assert not stale, f"run `python -m mtlhooks.docs` to regenerate {stale}"


@pytest.mark.parametrize("name", docs.hook_names())
def test_every_hook_is_documented_with_its_signature(name):
    """Like datasette's docs test: each hook appears in docs/hooks.md with its exact signature,
    and has a docstring saying when it fires."""
    function = getattr(hookspecs, name)
    text = (docs.ROOT / "docs" / "hooks.md").read_text(encoding="utf-8")
    signature = f"{name}{inspect.signature(function)}".replace("'", "")
    assert signature in text
    assert "Fires" in (function.__doc__ or "") or "Runs" in (function.__doc__ or "")


def test_bench_quick_json_has_the_documented_layout(capsys):
    """The benchmark runs (no timing is asserted: this machine is shared and noisy)."""
    from mtlhooks.bench import run

    result = run(quick=True)
    assert isinstance(result["device"], str)
    keys = {
        "model",
        "tasks",
        "space",
        "method",
        "ratio_to_plain",
        "ratio_to_floor",
        "ratio_to_torchjd",
        "peak_mem_bytes",
    }
    spaces = {case["space"] for case in result["cases"]}
    assert {"none", "features", "last_shared", "params", "plain", "floor", "libmtl"} <= spaces
    for case in result["cases"]:
        assert keys <= set(case)
        assert case["ratio_to_plain"] > 0
        if case["space"] == "params":
            assert case["ratio_to_floor"] > 0
    json.dumps(result)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
        (["demo", "--lr", "-1"], "argument --lr: must be a finite number > 0, got -1"),
        (["demo", "--seed", str(2**64)], "argument --seed: must be in [0, 2**64)"),
        (["plot", "toy", "-o", "t.png", "--lr", "nan"], "argument --lr: must be a finite number"),
        (["plot", "toy", "-o", "t.png", "--steps", "x"], "expected a whole number, got 'x'"),
    ],
)
def test_bad_numbers_on_the_command_line_are_refused_before_any_work(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_validate_refuses_a_directory_clearly(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 1
    assert f"invalid: {tmp_path} is a directory, not a config file" in capsys.readouterr().err


def test_plugins_lists_a_required_option_of_a_third_party_plugin(registered, capsys):
    from pydantic import Field

    from mtlhooks import Family, Plugin, PluginConfig

    class NeedsScaleConfig(PluginConfig):
        scale: float = Field(gt=0, description="A scale, no default.")

    class NeedsScale(Plugin):
        """Needs a scale."""

        name = "needs_scale"
        family = Family.LOSS_SCALING
        Config = NeedsScaleConfig

    registered(NeedsScale)
    assert main(["plugins", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    (field,) = rows["needs_scale"]["fields"]
    assert field["required"] is True and field["default"] is None and field["type"] == "number"
    assert main(["plugins"]) == 0
    assert "scale = (required) (number): A scale, no default." in capsys.readouterr().out
