"""`mtlhooks plot`: figures of a logged run and of the toy, read back from matplotlib."""

from __future__ import annotations

import math

import pytest
import torch

from mtlhooks import MTL, plot
from mtlhooks.cli import main
from mtlhooks.problems import toy_losses

pytest.importorskip("matplotlib")


def log_run(problem, path, plugins, *, calls=4, split=False):
    config = {
        "tasks": problem.tasks,
        "plugins": [*plugins, {"name": "gradstats", "jsonl": str(path)}],
    }
    with MTL(config, shared=problem.model.encoder) as mtl:
        for _ in range(calls):
            z, outputs = problem.model(problem.x)
            per_sample = {
                t: (outputs[t] - 0.5 * (i + 1)).pow(2).mean(1) * 10.0**i
                for i, t in enumerate(problem.tasks)
            }
            if split:
                mtl.plugins["gradstats"].split_batch(per_sample, problem.model.encoder.parameters())
            mtl.backward({t: v.mean() for t, v in per_sample.items()}, features=z)
            problem.zero_grad()
    return plot.load_records(path)


@pytest.fixture
def figures(monkeypatch):
    """The figures plot functions draw, kept open for inspection."""
    drawn = []

    def keep(figure, out):
        drawn.append(figure)
        return out

    monkeypatch.setattr(plot, "_save", keep)
    return drawn


def panels(figure):
    return {ax.get_title(): ax for ax in figure.axes if ax.get_title()}


def legend_labels(ax):
    legend = ax.get_legend()
    return [] if legend is None else [text.get_text() for text in legend.get_texts()]


def test_every_panel_of_a_run_has_a_y_label_and_a_legend_of_drawn_lines(problem, tmp_path, figures):
    records = log_run(problem, tmp_path / "r.jsonl", [{"name": "static", "weights": {"c": 0.01}}])
    plot.plot_run(records, "unused.png")
    (figure,) = figures
    for ax in figure.axes:
        assert ax.get_ylabel(), ax.get_title()
        drawn = {line.get_label() for line in ax.get_lines()}
        assert set(legend_labels(ax)) <= drawn | {"max/min ‖∇Lᵢ‖ (right)"}, ax.get_title()
    by_title = panels(figure)
    conflict = by_title["conflict rate and norm imbalance"]
    assert legend_labels(conflict) == ["conflict rate", "max/min ‖∇Lᵢ‖ (right)"]
    norms = next(ax for title, ax in by_title.items() if title.startswith("task-gradient norms"))
    assert norms.get_yscale() == "log"
    assert "dashed" in norms.get_title()  # weights differ, so weighted norms are drawn
    weights = by_title["effective weights (multiplier of ∇Lᵢ in the update)"]
    assert sorted(legend_labels(weights)) == ["a = b", "c"]  # a and b are equal: one line


def test_the_norm_panel_is_always_logarithmic(problem, tmp_path, figures):
    """Equal weights (weighted = unweighted norms) and a run with two tasks near zero: the
    scale no longer depends on the spread of the values."""
    records = log_run(problem, tmp_path / "r.jsonl", [])
    for record in records:
        record["grad_norms"] = {"a": 1e-9, "b": 2e-9, "c": 5.0}
        record["weighted_grad_norms"] = dict(record["grad_norms"])
    plot.plot_run(records, "unused.png")
    norms = next(ax for t, ax in panels(figures[0]).items() if t.startswith("task-gradient"))
    assert norms.get_yscale() == "log"
    assert norms.get_title() == "task-gradient norms (weighted equal to unweighted)"


def test_graddrop_run_shows_loss_weights_with_a_note(problem, tmp_path, figures):
    records = log_run(problem, tmp_path / "r.jsonl", ["graddrop"])
    assert "weights" not in records[0]
    plot.plot_run(records, "unused.png")
    weights = panels(figures[0])["loss weights (no effective weights recorded)"]
    notes = " ".join(text.get_text() for text in weights.texts)
    assert "coordinate-wise" in notes and "GradDrop" in notes
    assert legend_labels(weights) == ["a = b = c"]
    norms = next(ax for t, ax in panels(figures[0]).items() if t.startswith("task-gradient"))
    assert legend_labels(norms) == ["a", "b", "c"]  # no legend entry for undrawn weighted norms


def test_pairs_and_halves_never_share_a_colour(problem, tmp_path, figures):
    records = log_run(problem, tmp_path / "r.jsonl", [], split=True)
    plot.plot_run(records, "unused.png")
    for title in (
        "cosine between task gradients",
        "gradient magnitude similarity (1: equal norms)",
    ):
        ax = panels(figures[0])[title]
        lines = ax.get_lines()
        pairs = {line.get_color() for line in lines if "–" in line.get_label()}
        halves = {line.get_color() for line in lines if line.get_label().startswith("halves")}
        assert len(pairs) == 3 and len(halves) == 3 and not pairs & halves


def test_a_line_cut_by_a_crash_is_skipped_with_a_warning(problem, tmp_path, capsys):
    log = tmp_path / "r.jsonl"
    log_run(problem, log, [])
    with log.open("a") as handle:
        handle.write('{"step": 4, "losses": {"a": 0.1')
    out = tmp_path / "r.png"
    assert main(["plot", str(log), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == (
        f"warning: {log}:5: skipped the last line, which does not parse "
        "(Expecting ',' delimiter): cut by a crash?\n"
    )
    assert out.read_bytes()[:4] == b"\x89PNG"
    # A bad line anywhere else is an error, not skipped.
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "{oops", *lines[1:4]]) + "\n")
    assert main(["plot", str(log), "-o", str(out)]) == 2
    assert f"{log}:2: not a JSON record" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("toy.xyz", r"'.xyz' is not an image format matplotlib writes; use .*\.png.*\.svg"),
        ("toy", r"-o toy has no extension to tell the image format; use .*\.png"),
        ("{dir}", r"is a directory; give a file name"),
    ],
)
def test_a_bad_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch, output, message):
    import re

    def never(*args, **kwargs):
        raise AssertionError("trained before checking -o")

    monkeypatch.setattr(plot, "toy_trajectories", never)
    assert main(["plot", "toy", "-o", output.format(dir=tmp_path)]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="uses /proc")
def test_an_unwritable_image_is_an_output_error(problem, tmp_path, capsys):
    log = tmp_path / "r.jsonl"
    log_run(problem, log, [], calls=2)
    assert main(["plot", str(log), "-o", "/proc/run.png"]) == 2
    assert "error: cannot write /proc/run.png" in capsys.readouterr().err


# -- the toy ---------------------------------------------------------------------------------


def test_pareto_stationarity_measures_how_opposite_the_unit_gradients_are():
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert plot.pareto_stationarity(g, -7 * g) == 0.0
    assert plot.pareto_stationarity(g, 0.1 * g) == pytest.approx(1.0)
    assert plot.pareto_stationarity(g, torch.tensor([-4.0, 3.0])) == pytest.approx(
        math.cos(math.pi / 4)
    )
    assert plot.pareto_stationarity(g, torch.zeros(2)) == 0.0
    # Independent of the scale of either gradient:
    h = torch.tensor([-1.0, 0.2], dtype=torch.float64)
    assert plot.pareto_stationarity(1e-6 * g, 1e6 * h) == pytest.approx(
        plot.pareto_stationarity(g, h)
    )


def toy_gradients(point):
    x = torch.tensor(point, dtype=torch.float64, requires_grad=True)
    first, second = toy_losses(x)
    return [torch.autograd.grad(loss, x, retain_graph=True)[0] for loss in (first, second)]


def test_a_trajectory_ends_where_it_is_pareto_stationary():
    """From a point of the Pareto set every method stops at once, Nash-MTL included (its
    weights are not defined there); elsewhere the trajectory takes its steps."""
    on_the_set = torch.tensor([[2.0, plot.TOY_PARETO_X2]], dtype=torch.float64)
    assert plot.pareto_stationarity(*toy_gradients(on_the_set[0].tolist())) < 1e-3
    methods = {"equal weights": [], "nash_mtl": ["nash_mtl"], "mgda": ["mgda"]}
    paths = plot.toy_trajectories(methods, starts=on_the_set, steps=50)
    assert all(path.shape == (1, 2) for runs in paths.values() for path in runs)
    away = torch.tensor([[-8.5, -5.0]], dtype=torch.float64)
    paths = plot.toy_trajectories({"mgda": ["mgda"]}, starts=away, steps=20)
    assert paths["mgda"][0].shape == (21, 2)


def test_the_toy_figure_names_its_axes_and_marks_how_each_trajectory_ended(figures):
    starts = torch.tensor([[-8.5, -5.0], [2.0, plot.TOY_PARETO_X2]], dtype=torch.float64)
    paths = plot.toy_trajectories({"equal weights": [], "mgda": ["mgda"]}, starts=starts, steps=15)
    plot.plot_toy(paths, "unused.png")
    (figure,) = figures
    shown = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == [
        "equal weights: 1 of 2 converged",
        "mgda: 1 of 2 converged",
    ]
    assert all(ax.get_ylabel() == "x₂" for ax in shown[:1]) and shown[0].get_xlabel() == "x₁"
    ends = [line.get_marker() for line in shown[1].get_lines() if line.get_marker() in ("s", "X")]
    assert ends == ["X", "s"]
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert "end: Pareto-stationary (converged)" in labels and "end: step budget spent" in labels
