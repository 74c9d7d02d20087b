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


def test_plugins_table(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^mgda\s+aggregator", out, flags=re.MULTILINE)


def test_validate_accepts_and_rejects(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("tasks: [a, b]\nplugins: [avgnorm, {name: pcgrad, reduction: mean}]\n")
    assert main(["validate", str(good)]) == 0
    assert "valid" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [a, b]\nplugins: [{name: pcgrad, reduction: average}]\n")
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "(pcgrad): reduction: Input should be 'sum' or 'mean' (got 'average')" in err


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
