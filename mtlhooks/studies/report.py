"""Regenerate the studies' documentation — tables and plots — from their JSON.

    python -m mtlhooks.studies.report --run     # run all three studies, then regenerate
    python -m mtlhooks.studies.report           # regenerate from the committed JSON only
    python -m mtlhooks.studies.report --check   # exit 1 if the docs differ from the JSON

With ``--run`` each study is run as ``mtlhooks study NAME --seeds N --json`` would, and its
output is written to ``docs/studies/NAME.json``; then the blocks between the ``study:`` markers
of ``docs/reproducing.md`` and of the README's "Reproducing the papers" section are rewritten
from those files, and ``docs/studies/*.png`` are drawn (needs matplotlib). Nothing else in the
documents is touched. Run it from a git checkout with committed code: the JSON records the
commit, and the docs say which commit produced them.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtlhooks.studies import STUDIES, default_jobs, dumps, run_study
from mtlhooks.studies.common import StudyError, fmt, pm

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "docs" / "studies"
DOC = ROOT / "docs" / "reproducing.md"
README = ROOT / "README.md"


def _formatter(name: str) -> Any:
    if name == "imbalance":
        from mtlhooks.studies import imbalance

        return imbalance.format_result
    if name == "adam":
        from mtlhooks.studies import adam

        return adam.format_result
    from mtlhooks.studies import conflicts

    return conflicts.format_result


def load(name: str, directory: Path = DATA) -> dict[str, Any]:
    import json

    path = directory / f"{name}.json"
    if not path.exists():
        raise StudyError(f"{path} is missing; run: python -m mtlhooks.studies.report --run")
    result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return result


def provenance_line(name: str, result: dict[str, Any]) -> str:
    """Which command, commit and machine produced a result, and how long it took."""
    origin = result["provenance"]
    commit = origin["commit"]
    state = (
        "unknown commit"
        if commit is None
        else f"commit `{commit[:12]}`" + (" with uncommitted changes" if origin["dirty"] else "")
    )
    wall, cpu = result["wall_seconds"], result["cpu_seconds_in_runs"]
    return (
        f"Produced by `mtlhooks study {name} --seeds {len(result['seeds'])} --jobs "
        f"{result['jobs']} --json` at {state} (torch {origin['torch']}, Python "
        f"{origin['python']}, {origin['cpus']} CPUs): {wall / 60:.1f} min wall, "
        f"{cpu / 60:.1f} min of CPU in its training runs."
    )


def doc_block(name: str, result: dict[str, Any]) -> str:
    """What goes between a study's markers in docs/reproducing.md."""
    return provenance_line(name, result) + "\n\n" + _formatter(name)(result)


def _imbalance_rows(result: dict[str, Any]) -> list[str]:
    rows = []
    for block in result["problems"]:
        avgnorm = next((r for r in block["rows"] if r["method"] == "avgnorm"), None)
        equal = next(r for r in block["rows"] if r["method"] == "equal weights")
        grid = next(r for r in block["rows"] if r["method"] == "grid search")
        verdict = block["verdict"]
        corr = block["correlation"]
        valid = "" if verdict["baselines_valid"] else " (single-task baselines NOT valid)"
        measured = (
            f"Δm: equal {pm(equal['delta_m'])}, grid {pm(grid['delta_m'])}, AvgNorm "
            f"{pm(avgnorm['delta_m']) if avgnorm else '—'}; AvgNorm − grid (paired) "
            f"{pm(avgnorm['minus_grid']) if avgnorm else '—'}"
        )
        if corr is not None:
            measured += (
                f"; share–change ρ = {fmt(corr['rho'], 2)} "
                f"[{fmt(corr['ci95'][0], 2)}, {fmt(corr['ci95'][1], 2)}]"
            )
        rows.append(
            f"| `mtlhooks study imbalance` | {block['label']}{valid} | {measured} | "
            f"AvgNorm vs grid: **{verdict['avgnorm_vs_grid']}** (±"
            f"{result['margins']['comparable_points']:g}); correlation: "
            f"**{verdict['correlation']}** |"
        )
    return rows


def _adam_rows(result: dict[str, Any]) -> list[str]:
    rows = []
    for verdict in result["verdicts"]:
        if "invariant" not in verdict:
            continue
        claimed = {True: "as claimed", False: "**not as claimed**", None: "no claim"}[
            verdict["as_claimed"]
        ]
        rows.append(
            f"| `mtlhooks study adam` | {verdict['claim']} | largest abs. change "
            f"{fmt(verdict['max_abs_change_percent'], 2)} % (noise floor "
            f"{fmt(verdict['noise_floor_percent'], 2)} %, bound {fmt(verdict['bound_percent'], 2)}"
            f" %), {verdict['runs_not_trained']} runs not trained | "
            f"{'invariant' if verdict['invariant'] else 'not invariant'}: {claimed} |"
        )
    return rows


def _conflicts_rows(result: dict[str, Any]) -> list[str]:
    rows = []
    for block in result["problems"]:
        trained = block["phases"]["trained"]
        angles = [s for s, v in trained.items() if v["verdict"]["angles_no_worse"]]
        magnitudes = [s for s, v in trained.items() if v["verdict"]["magnitudes_differ"]]
        sizes = list(trained)
        small, large = trained[sizes[0]], trained[sizes[-1]]
        measured = (
            f"cos tasks vs halves (STL): {pm(small['tasks_cosine'], 2)} vs "
            f"{pm(small['halves_stl_cosine'], 2)} at batch {sizes[0]}, "
            f"{pm(large['tasks_cosine'], 2)} vs {pm(large['halves_stl_cosine'], 2)} at "
            f"{sizes[-1]}; GMS tasks vs halves {pm(large['tasks_gms'], 2, sign=False)} vs "
            f"{pm(large['halves_stl_gms'], 2, sign=False)} at {sizes[-1]}"
        )

        def where(hits: list[str], sizes: list[str] = sizes) -> str:
            if not hits:
                return "at no batch size"
            if len(hits) == len(sizes):
                return "at every batch size"
            return "at batch " + ", ".join(hits) + " only"

        rows.append(
            f"| `mtlhooks study conflicts` | {block['label']} | {measured} | angles no worse: "
            f"**{where(angles)}**; magnitudes differ: **{where(magnitudes)}** |"
        )
    return rows


def readme_block(results: dict[str, dict[str, Any]]) -> str:
    """The summary table of the README's "Reproducing the papers" section."""
    lines = [
        "| command | setting / claim | measured (mean ± sd over seeds) | verdict (pre-stated "
        "margin) |",
        "| --- | --- | --- | --- |",
        *_imbalance_rows(results["imbalance"]),
        *_adam_rows(results["adam"]),
        *_conflicts_rows(results["conflicts"]),
    ]
    commits = {name: (r["provenance"]["commit"] or "unknown")[:12] for name, r in results.items()}
    lines += [
        "",
        "Generated by `python -m mtlhooks.studies.report` from docs/studies/*.json (commits: "
        + ", ".join(f"{n} `{c}`" for n, c in commits.items())
        + ").",
    ]
    return "\n".join(lines)


def replace_block(text: str, name: str, content: str) -> str:
    """Replace what lies between ``<!-- study:NAME:start -->`` and ``<!-- study:NAME:end -->``."""
    start, end = f"<!-- study:{name}:start -->", f"<!-- study:{name}:end -->"
    if text.count(start) != 1 or text.count(end) != 1:
        raise StudyError(f"expected exactly one {start} … {end} pair")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{content}\n{end}{tail}"


def render(results: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """The new texts of docs/reproducing.md and README.md."""
    doc = DOC.read_text(encoding="utf-8")
    for name in STUDIES:
        doc = replace_block(doc, name, doc_block(name, results[name]))
    readme = replace_block(README.read_text(encoding="utf-8"), "summary", readme_block(results))
    return doc, readme


# -- plots ---------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise StudyError('the plots need matplotlib: pip install "mtlhooks[plot]"') from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_imbalance(result: dict[str, Any], path: Path) -> None:
    """Per problem: each grid run's (task share of the update, task change) points."""
    plt = _pyplot()
    blocks = result["problems"]
    fig, axes = plt.subplots(1, len(blocks), figsize=(4.6 * len(blocks), 4.0), squeeze=False)
    for ax, block in zip(axes[0], blocks):
        tasks = [t["name"] for t in block["tasks"]]
        base = block["baseline_per_seed"]["test"][str(block["grid"]["search_seed"])]
        specs = block["tasks"]
        for k, task in enumerate(tasks):
            xs, ys = [], []
            for point in block["grid"]["points"]:
                if point["failure"] is None and point["log_share"] is not None:
                    xs.append(point["log_share"][task])
                    sign = 1.0 if specs[k]["higher_is_better"] else -1.0
                    ys.append(100 * sign * (point["test"][task] - base[task]) / base[task])
            ax.scatter(xs, ys, s=14, label=task)
        corr = block["correlation"]
        title = block["label"]
        if corr is not None:
            title += f"\nSpearman ρ = {fmt(corr['rho'], 2)}"
        ax.set_title(title, fontsize=9)
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("log(task's |w|·‖g‖ / mean over tasks), last shared layer")
        ax.set_ylabel("change vs single-task, test (%)")
        ax.set_ylim(bottom=max(ax.get_ylim()[0], -150))
        ax.legend(title="task", fontsize=8)
    fig.suptitle("Grid runs of the imbalance study (seed 0): share of the update vs change")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_conflicts(result: dict[str, Any], path: Path) -> None:
    """Per problem: cosine, conflict rate and GMS against the batch size, trained models."""
    plt = _pyplot()
    blocks = result["problems"]
    fig, axes = plt.subplots(len(blocks), 3, figsize=(13, 3.4 * len(blocks)), squeeze=False)
    series = {
        "tasks (MTL model)": ("tasks", "C0", "-"),
        "halves, STL models": ("halves_stl", "C1", "--"),
        "halves, MTL model": ("halves_mtl", "C2", ":"),
    }
    quantities = (
        ("cosine", "mean cosine", (-0.25, 1.0)),
        ("conflict", "conflict rate", (0.0, 1.0)),
        ("gms", "GMS (1: equal norms)", (0.0, 1.02)),
    )
    for row, block in zip(axes, blocks):
        trained = block["phases"]["trained"]
        sizes = [int(s) for s in trained]
        for ax, (quantity, ylabel, limits) in zip(row, quantities):
            for label, (prefix, colour, style) in series.items():
                stats = [trained[str(s)].get(f"{prefix}_{quantity}") for s in sizes]
                if any(s is None for s in stats):
                    continue
                means = [s["mean"] for s in stats]
                sds = [s["sd"] if math.isfinite(s["sd"] or math.nan) else 0.0 for s in stats]
                ax.errorbar(
                    sizes,
                    means,
                    yerr=sds,
                    color=colour,
                    ls=style,
                    marker="o",
                    ms=3,
                    capsize=2,
                    label=label,
                )
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(s) for s in sizes])
            ax.set_ylim(*limits)
            ax.set_xlabel("batch size (each half: half of it)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{block['label']}: {ylabel}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_adam(result: dict[str, Any], path: Path) -> None:
    """Change of each task's test RMSE against the loss factor, per experiment and optimiser;
    a condition where some run diverged or collapsed is drawn as a cross on the axis, not as a
    finite value."""
    plt = _pyplot()
    panel = {"one": "one", "heads": "heads", "all": "all", "all_eps": "all"}
    blocks = [b for b in result["blocks"] if b["experiment"] in panel]
    experiments = list(dict.fromkeys(panel[b["experiment"]] for b in blocks))
    fig, axes = plt.subplots(
        1, len(experiments), figsize=(5.2 * len(experiments), 4.2), squeeze=False
    )
    styles = {"adam": "-", "sgd fixed": "--", "sgd tuned": ":", "adam tiny eps": "-."}
    for ax, experiment in zip(axes[0], experiments):
        mine = [b for b in blocks if panel[b["experiment"]] == experiment]
        untrained: list[tuple[float, str]] = []
        for block in mine:
            rows = [r for r in block["rows"] if r["factor"] is not None]
            for k, task in enumerate(result["trivial"]):
                xs, ys = [], []
                for row in rows:
                    if all(status == "ok" for status in row["status"]):
                        xs.append(row["factor"])
                        ys.append(row["change_percent"][task]["mean"])
                tiny = block["experiment"] == "all_eps"
                ax.plot(
                    xs,
                    ys,
                    color=f"C{k}",
                    ls=styles["adam tiny eps" if tiny else block["optimizer"]],
                    marker="o",
                    ms=3,
                    label=f"{task}, {block['label']}" + (", ε = 1e-20" if tiny else ""),
                )
            for row in rows:
                if not all(status == "ok" for status in row["status"]):
                    untrained.append((row["factor"], block["label"]))
        low, high = ax.get_ylim()
        for factor, label in untrained:
            ax.plot([factor], [high], marker="x", color="red", ms=8, clip_on=False)
            ax.annotate(
                label.replace(", ", "\n"),
                (factor, high),
                textcoords="offset points",
                xytext=(0, -22),
                ha="center",
                fontsize=6,
                color="red",
            )
        if untrained:
            ax.plot([], [], "x", color="red", label="some run diverged or collapsed")
        floor = mine[0]["noise_floor_percent"]
        if floor:
            ax.axhspan(-floor, floor, color="grey", alpha=0.3, label="Adam's rounding noise floor")
        ax.set_ylim(low, high)
        ax.set_xscale("log")
        ax.set_xlabel("loss factor c")
        ax.set_ylabel("change of test RMSE vs ×1 (%, positive = worse)")
        ax.set_title(mine[0]["description"], fontsize=9)
        ax.legend(fontsize=6, loc="best")
    fig.suptitle("adam study: mean over seeds of each task's change (t1 and t2 overlap)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plots(results: dict[str, dict[str, Any]], directory: Path = DATA) -> list[Path]:
    drawn = []
    for name, draw in (
        ("imbalance", plot_imbalance),
        ("adam", plot_adam),
        ("conflicts", plot_conflicts),
    ):
        path = directory / f"{name}.png"
        draw(results[name], path)
        drawn.append(path)
    return drawn


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtlhooks.studies.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", action="store_true", help="run the studies first")
    parser.add_argument("--only", default=None, help="with --run: comma-separated studies")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=default_jobs())
    parser.add_argument("--check", action="store_true", help="only check the docs are current")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.run:
            names = STUDIES if args.only is None else tuple(args.only.split(","))
            DATA.mkdir(parents=True, exist_ok=True)
            for name in names:
                if name not in STUDIES:
                    raise StudyError(f"unknown study {name!r}; studies are {STUDIES}")
                result = run_study(name, seeds=args.seeds, jobs=args.jobs)
                (DATA / f"{name}.json").write_text(dumps(result), encoding="utf-8")
                print(f"{name}: {result['wall_seconds'] / 60:.1f} min", file=sys.stderr)
        results = {name: load(name) for name in STUDIES}
        doc, readme = render(results)
        if args.check:
            stale = [
                str(p)
                for p, text in ((DOC, doc), (README, readme))
                if p.read_text(encoding="utf-8") != text
            ]
            if stale:
                print("out of date: " + ", ".join(stale), file=sys.stderr)
                return 1
            return 0
        DOC.write_text(doc, encoding="utf-8")
        README.write_text(readme, encoding="utf-8")
        written = [DOC, README]
        if not args.no_plots:
            written += plots(results)
        print("\n".join(str(p) for p in written))
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
