"""The README's own commands, with their real defaults at reduced size: the demo, the toy plot,
a logged run and its plot, validate, plugins and schema. A command that works only with
hand-picked options is not what a newcomer runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from mtlhooks import MTL, docs
from mtlhooks.cli import main
from mtlhooks.demo import DEMO_CONFIGS

README = (docs.ROOT / "README.md").read_text(encoding="utf-8")


def readme_config() -> str:
    """The config file the README shows (its first YAML block)."""
    return re.findall(r"```yaml\n(.*?)```", README, flags=re.S)[0]


def test_the_readme_names_the_commands_tested_here():
    for command in (
        "mtlhooks demo",
        "mtlhooks validate mtl.yaml",
        "mtlhooks schema",
        "mtlhooks plugins",
        "mtlhooks plot RUN.jsonl -o run.png",
        "mtlhooks plot toy -o toy.png",
    ):
        assert command in README, command


def test_demo_runs_every_configuration_without_a_warning():
    """A fresh interpreter, as `mtlhooks demo` starts: nothing but the bar and the table."""
    result = subprocess.run(
        [sys.executable, "-W", "always", "-m", "mtlhooks.cli", "demo", "--steps", "12"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "warning" not in result.stderr, result.stderr
    lines = result.stdout.strip().splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line) == {"-"})
    names = [line.split("  ")[0] for line in lines[rule + 1 :]]
    assert names == list(DEMO_CONFIGS)
    assert len(result.stderr.strip().splitlines()) == 8  # one final progress line per config


def test_toy_plot_with_the_default_methods(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from mtlhooks import plot

    out = tmp_path / "toy.png"
    assert main(["plot", "toy", "-o", str(out), "--steps", "30", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert len(plot.toy_methods()) == 1 + len(plot.TOY_PREFERRED)


def test_the_readme_config_validates_trains_logs_and_plots(tmp_path, monkeypatch, capsys):
    """`mtlhooks validate mtl.yaml`, the README's two-line loop with that config, then
    `mtlhooks plot runs/gradstats.jsonl -o run.png`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mtl.yaml").write_text(readme_config())
    assert main(["validate", "mtl.yaml"]) == 0
    told = capsys.readouterr().out
    assert told.startswith(
        "valid: tasks ['seg', 'depth'], plugins: static, avgnorm, pcgrad, gradstats"
    )
    assert "space: auto → params given shared=" in told

    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8))
    heads = nn.ModuleDict({"seg": nn.Linear(8, 3), "depth": nn.Linear(8, 1)})
    mtl = MTL.from_config("mtl.yaml", shared=encoder)
    optimizer = torch.optim.Adam([*encoder.parameters(), *heads.parameters(), *mtl.parameters()])
    x = torch.randn(32, 4)
    targets = {"seg": torch.randint(0, 3, (32,)), "depth": torch.randn(32, 1)}
    for _ in range(101):  # gradstats records every 50 calls
        optimizer.zero_grad()
        z = encoder(x)
        losses = {
            "seg": nn.functional.cross_entropy(heads["seg"](z), targets["seg"]),
            "depth": nn.functional.mse_loss(heads["depth"](z), targets["depth"]),
        }
        mtl.backward(losses, features=z)
        optimizer.step()
    mtl.close()
    log = tmp_path / "runs" / "gradstats.jsonl"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [0, 50, 100]

    pytest.importorskip("matplotlib")
    assert main(["plot", "runs/gradstats.jsonl", "-o", "run.png"]) == 0
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"


def test_plugins_and_schema(capsys):
    assert main(["plugins"]) == 0
    assert main(["plugins", "--json"]) == 0
    assert main(["schema"]) == 0
    out = capsys.readouterr().out
    assert "gradstats  (observer;" in out and '"name": "gradstats"' in out and '"$schema"' in out
