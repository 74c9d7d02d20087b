"""`mtlhooks study` and `mtlhooks plot`: the quick studies end to end, the scores they rest on
(Δm, correlations) by hand, and the PNGs."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from mtlhooks import MTL
from mtlhooks.cli import main
from mtlhooks.problems import toy_losses
from mtlhooks.studies import common


def run_cli_json(capsys, *args: str) -> dict:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


# -- scores -------------------------------------------------------------------------------


def test_delta_m_signs_lower_and_higher_is_better_metrics():
    tasks = (
        common.TaskSpec("err", "regression", 1),
        common.TaskSpec("acc", "classification", 10),
    )
    baseline = {"err": 0.5, "acc": 0.8}
    # error 0.5 → 0.6 is a 20 % drop; accuracy 0.8 → 0.9 a 12.5 % gain (drop −12.5 %).
    metrics = {"err": 0.6, "acc": 0.9}
    assert common.drops(metrics, baseline, tasks) == pytest.approx({"err": 20.0, "acc": -12.5})
    assert common.delta_m(metrics, baseline, tasks) == pytest.approx((20.0 - 12.5) / 2)
    assert common.delta_m(baseline, baseline, tasks) == 0.0


def test_correlations_match_hand_values():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert common.pearson(x, [2 * v + 1 for v in x]) == pytest.approx(1.0)
    assert common.spearman(x, [v**3 for v in x]) == pytest.approx(1.0)
    assert common.spearman(x, [-math.exp(v) for v in x]) == pytest.approx(-1.0)
    y = [2.0, 1.0, 4.0, 3.0, 5.0]
    # Pearson by hand: deviations (−2,−1,0,1,2) and (−1,−2,1,0,2): Σxy = 8, Σx² = Σy² = 10.
    assert common.pearson(x, y) == pytest.approx(0.8)
    assert common.spearman([1.0, 1.0, 2.0], [3.0, 3.0, 1.0]) == pytest.approx(-1.0)  # ties
    assert math.isnan(common.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_adam_single_task_ignores_the_loss_scale_sgd_does_not():
    """What the adam study rests on: with one task every parameter sees one loss, and Adam's
    update does not depend on its scale (up to ε); SGD's does."""
    problem = common.regression_problem((1.0,), n_train=320)
    results = {}
    for optimizer, lr in (("adam", 3e-3), ("sgd", 0.01)):
        settings = common.Settings(steps=15, optimizer=optimizer, lr=lr)
        for scale in (1.0, 100.0):
            run = common.train(problem, [], settings, multipliers={"t0": scale})
            assert run.failure is None
            results[optimizer, scale] = run.test["t0"]
    # float32 rounding and ε keep it from being exact
    assert results["adam", 100.0] == pytest.approx(results["adam", 1.0], rel=2e-3)
    assert results["sgd", 100.0] != pytest.approx(results["sgd", 1.0], rel=0.05)


# -- studies --------------------------------------------------------------------------------


def test_study_imbalance_quick_json(capsys):
    result = run_cli_json(capsys, "study", "imbalance", "--quick", "--json", "--no-progress")
    assert result["study"] == "imbalance" and result["quick"] is True
    regression = result["problems"][0]
    methods = [row["method"] for row in regression["rows"]]
    assert methods[:3] == ["equal weights", "grid search (best of 2)", "avgnorm"]
    assert set(common.aggregators()) <= set(methods)
    tasks = tuple(
        common.TaskSpec(t["name"], "classification" if t["higher_is_better"] else "regression", 1)
        for t in regression["tasks"]
    )
    for row in regression["rows"]:
        if row["failure"] is None:
            want = common.delta_m(row["test"], regression["baseline"]["test"], tasks)
            assert row["delta_m"] == pytest.approx(want)
    avgnorm = next(row for row in regression["rows"] if row["method"] == "avgnorm")
    # AvgNorm equalises the weighted gradient norms on the last shared layer, where it
    # measures them: the recorded max/min ratio is 1.
    assert avgnorm["max_min_ratio"] == pytest.approx(1.0, rel=1e-4)
    # Rows without effective weights (coordinate-wise aggregators) have no norm share.
    measured = [
        r
        for r in regression["rows"]
        if r["failure"] is None
        and r["mean_weighted_norms"] is not None
        and math.isfinite(r["delta_m"])
    ]
    assert regression["correlation"]["points"] == 2 * len(measured)
    assert "| equal weights" in result["table"]


def test_study_adam_quick_json(capsys):
    result = run_cli_json(capsys, "study", "adam", "--quick", "--json", "--no-progress")
    rows = result["rows"]
    assert [(r["optimizer"], r["scale"]) for r in rows] == [
        (o, s) for o in ("sgd", "adam") for s in (1.0, 10.0, 100.0, 1000.0)
    ]
    for row in rows:
        if row["scale"] == 1.0:
            assert row["change_percent"] == {"t0": 0.0, "t1": 0.0, "t2": 0.0}
    adam = [r for r in rows if r["optimizer"] == "adam"]
    assert all(r["failure"] is None for r in adam)
    assert "Adam" in result["table"]


def test_study_conflicts_quick_json(capsys, tmp_path):
    result = run_cli_json(
        capsys,
        "study",
        "conflicts",
        "--quick",
        "--json",
        "--no-progress",
        "--log-dir",
        str(tmp_path),
    )
    block = result["problems"][0]
    assert list(block["phases"]) == ["early", "middle", "late"]
    for values in block["phases"].values():
        for key, value in values.items():
            low = -1.0 if key.endswith("cosine") else 0.0
            assert low <= value <= 1.0, key
    # the observer's records were written and carry the half-batch statistics
    logged = (tmp_path / "conflicts-regression.jsonl").read_text().splitlines()
    assert all("split" in json.loads(line) for line in logged)


# -- plots ---------------------------------------------------------------------------------


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_of_a_logged_run_writes_a_png(problem, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    log = tmp_path / "run.jsonl"
    config = {"tasks": problem.tasks, "plugins": [{"name": "gradstats", "jsonl": str(log)}]}
    with MTL(config, shared=problem.model.encoder) as mtl:
        for _ in range(4):
            _, outputs = problem.model(problem.x)
            per_sample = {t: outputs[t].pow(2).mean(1) for t in problem.tasks}
            mtl.plugins["gradstats"].split_batch(per_sample, problem.model.encoder.parameters())
            mtl.backward({t: v.mean() for t, v in per_sample.items()})
    out = tmp_path / "plots" / "run.png"
    assert main(["plot", str(log), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert png_size(out) == (1320, 1100)


def test_plot_toy_writes_a_png_and_equal_weights_is_plain_adam(tmp_path):
    pytest.importorskip("matplotlib")
    from mtlhooks import plot

    start = torch.tensor([[-8.5, 7.5]], dtype=torch.float64)
    paths = plot.toy_trajectories(
        {"equal weights": [], "mgda": ["mgda"]}, starts=start, steps=25, lr=0.05
    )
    x = torch.nn.Parameter(start[0].clone())
    optimizer = torch.optim.Adam([x], lr=0.05)
    for _ in range(25):
        optimizer.zero_grad()
        sum(toy_losses(x)).backward()
        optimizer.step()
    torch.testing.assert_close(paths["equal weights"][0][-1], x.detach())
    assert paths["mgda"][0].shape == (26, 2)
    assert not torch.equal(paths["mgda"][0][-1], paths["equal weights"][0][-1])
    out = plot.plot_toy(paths, tmp_path / "toy.png")
    width, height = png_size(out)
    assert width > height > 300


def test_plot_toy_command_and_its_errors(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "toy.png"
    args = ["plot", "toy", "-o", str(out), "--steps", "3", "--methods", "pcgrad", "--no-progress"]
    assert main(args) == 0
    png_size(out)
    assert main(["plot", "toy", "-o", str(out), "--methods", "pcgrd"]) == 2
    assert "did you mean 'pcgrad'" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing.jsonl"), "-o", str(out)]) == 2
    assert "neither 'toy' nor a file" in capsys.readouterr().err
