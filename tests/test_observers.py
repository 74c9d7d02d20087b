"""The gradstats observer and its backends: every number read back from what was written and
compared with plain autograd."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch

from mtlhooks import MTL, ConfigError, InputError, OutputError, Space, load_config, stats
from mtlhooks.backends import ConsoleBackend, CSVBackend, MemoryBackend, flatten

TASKS = ("a", "b", "c")


def jacobian(problem, params, losses=None) -> torch.Tensor:
    """T×P matrix of per-task gradients by plain autograd."""
    if losses is None:
        _, losses = problem.losses()
    rows = []
    for t in problem.tasks:
        grads = torch.autograd.grad(losses[t], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def expected_block(g: torch.Tensor, tasks=TASKS) -> dict:
    norms = g.norm(dim=1)
    cosine = (g @ g.T) / (norms[:, None] * norms[None, :])
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
    return {
        "norms": norms,
        "cosine": {(tasks[i], tasks[j]): float(cosine[i, j]) for i, j in pairs},
        "gms": {
            (tasks[i], tasks[j]): float(2 * norms[i] * norms[j] / (norms[i] ** 2 + norms[j] ** 2))
            for i, j in pairs
        },
        "conflicts": sum(float(cosine[i, j] < 0) for i, j in pairs) / len(pairs),
        "ratio": float(norms.max() / norms.min()),
        "cv": float(norms.std(unbiased=False) / norms.mean()),
    }


def check_block(record: dict, g: torch.Tensor) -> None:
    want = expected_block(g)
    got = torch.tensor([record["grad_norms"][t] for t in TASKS], dtype=torch.float64)
    torch.testing.assert_close(got, want["norms"])
    for (a, b), value in want["cosine"].items():
        assert record["cosine"][a][b] == pytest.approx(value, rel=1e-9)
    for (a, b), value in want["gms"].items():
        assert record["magnitude_similarity"][a][b] == pytest.approx(value, rel=1e-9)
    assert record["conflict_rate"] == pytest.approx(want["conflicts"])
    assert record["norm_imbalance"]["max_min_ratio"] == pytest.approx(want["ratio"])
    assert record["norm_imbalance"]["coefficient_of_variation"] == pytest.approx(want["cv"])


def test_jsonl_csv_and_console_hold_the_autograd_statistics(problem, tmp_path, capsys):
    jsonl, table = tmp_path / "run.jsonl", tmp_path / "run.csv"
    config = {
        "tasks": TASKS,
        "plugins": [
            {"name": "static", "weights": {"c": 0.01}},
            {
                "name": "gradstats",
                "every": 2,
                "per_layer": True,
                "groups": {"first": ["0."], "last": ["2."]},
                "console": True,
                "jsonl": str(jsonl),
                "csv": str(table),
            },
        ],
    }
    encoder = problem.model.encoder
    params = list(encoder.parameters())
    expected = []
    with MTL(config, shared=encoder) as mtl:
        for _ in range(3):
            _, losses = problem.losses()
            expected.append(jacobian(problem, params, losses))
            mtl.backward(losses)
            for p in problem.model.parameters():  # move, so each step differs
                p.data.sub_(0.01 * p.grad)
            problem.zero_grad()
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]
    for record, g in zip(records, [expected[0], expected[2]]):
        check_block(record, g)
        assert record["weights"] == {"a": 1.0, "b": 1.0, "c": 0.01}
        weighted = g.norm(dim=1) * torch.tensor([1.0, 1.0, 0.01], dtype=torch.float64)
        assert [record["weighted_grad_norms"][t] for t in TASKS] == pytest.approx(weighted.tolist())
        # per layer: the columns of J belonging to each parameter
        offset = 0
        for (name, p), _ in zip(encoder.named_parameters(), range(4)):
            check_block(record["layers"][name], g[:, offset : offset + p.numel()])
            offset += p.numel()
        first = sum(p.numel() for p in params[:2])
        check_block(record["groups"]["first"], g[:, :first])
        check_block(record["groups"]["last"], g[:, first:])

    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [0, 2]
    for row, record in zip(rows, records):
        assert float(row["cosine/a/c"]) == pytest.approx(record["cosine"]["a"]["c"])
        assert float(row["groups/last/grad_norms/b"]) == pytest.approx(
            record["groups"]["last"]["grad_norms"]["b"]
        )
        assert float(row["weights/c"]) == pytest.approx(0.01)

    err = capsys.readouterr().err
    assert err.count("step 0 · params") == 1 and "step 2 · params" in err
    cos_ab = f"{records[0]['cosine']['a']['b']:+.2f}"
    assert cos_ab in err and "group last: conflicts" in err


def test_every_n_records_only_those_steps_and_takes_the_fast_path_between(problem):
    mtl = MTL(
        {"tasks": TASKS, "plugins": [{"name": "gradstats", "every": 3}]},
        shared=problem.model.encoder,
    )
    memory = MemoryBackend()
    mtl.plugins["gradstats"].attach(memory)
    spaces = []
    for _ in range(7):
        _, losses = problem.losses()
        spaces.append(mtl.backward(losses).space)
    assert [r["step"] for r in memory.records] == [0, 3, 6]
    assert spaces == [Space.PARAMS, Space.NONE, Space.NONE] * 2 + [Space.PARAMS]


class FakeAccelerator:
    def __init__(self) -> None:
        self.calls: list[tuple[dict, int | None]] = []

    def log(self, values: dict, step: int | None = None) -> None:
        self.calls.append((values, step))


def test_attach_logs_flat_finite_numbers_to_an_accelerate_tracker(problem):
    mtl = MTL({"tasks": TASKS, "plugins": ["gradstats"]}, shared=problem.model.encoder)
    accelerator = FakeAccelerator()
    mtl.plugins["gradstats"].attach(accelerator)
    params = list(problem.model.encoder.parameters())
    g = jacobian(problem, params)
    for _ in range(2):
        _, losses = problem.losses()
        mtl.backward(losses)
    assert [step for _, step in accelerator.calls] == [0, 1]
    values = accelerator.calls[0][0]
    want = expected_block(g)
    assert values["gradstats/grad_norms/c"] == pytest.approx(float(want["norms"][2]))
    assert values["gradstats/cosine/b/c"] == pytest.approx(want["cosine"][("b", "c")])
    assert values["gradstats/skipped"] == 0.0
    assert all(isinstance(v, float) and math.isfinite(v) for v in values.values())
    assert "gradstats/space" not in values  # strings are not tracker values


def test_attach_refuses_an_object_without_log(problem):
    mtl = MTL({"tasks": TASKS, "plugins": ["gradstats"]}, shared=problem.model.encoder)
    with pytest.raises(InputError, match="no log"):
        mtl.plugins["gradstats"].attach(object())


def test_tensorboard_event_file_holds_the_scalars(problem, tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    config = {"tasks": TASKS, "plugins": [{"name": "gradstats", "tensorboard": str(tmp_path)}]}
    g = jacobian(problem, list(problem.model.encoder.parameters()))
    with MTL(config, shared=problem.model.encoder) as mtl:
        _, losses = problem.losses()
        mtl.backward(losses)
    events = accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    want = expected_block(g)
    for i, task in enumerate(TASKS):
        (scalar,) = events.Scalars(f"gradstats/grad_norms/{task}")
        assert scalar.step == 0
        assert scalar.value == pytest.approx(float(want["norms"][i]), rel=1e-6)
    (scalar,) = events.Scalars("gradstats/magnitude_similarity/a/b")
    assert scalar.value == pytest.approx(want["gms"][("a", "b")], rel=1e-6)


def test_tensorboard_missing_is_a_config_error_at_validation(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec

    def without_tensorboard(name, *args, **kwargs):
        return None if name == "tensorboard" else find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_tensorboard)
    config = {"tasks": TASKS, "plugins": [{"name": "gradstats", "tensorboard": str(tmp_path)}]}
    with pytest.raises(
        ConfigError, match=r"tensorboard: .*pip install \"mtlhooks\[tensorboard\]\""
    ):
        load_config(config)
    assert list(tmp_path.iterdir()) == []


def test_split_batch_gives_the_half_batch_baseline(problem):
    """STL: cos/GMS between the two halves of one task's batch; MTL: between tasks on the
    same half, averaged over both halves — checked against plain autograd."""
    mtl = MTL(
        {"tasks": TASKS, "plugins": [{"name": "gradstats", "every": 2}]},
        shared=problem.model.encoder,
    )
    observer = mtl.plugins["gradstats"]
    params = list(problem.model.encoder.parameters())
    z, outputs = problem.model(problem.x)
    per_sample = {
        t: ((outputs[t] - 0.5 * (i + 1)) ** 2).mean(dim=1) * 10.0**i for i, t in enumerate(TASKS)
    }
    half = problem.x.shape[0] // 2  # 9 samples: halves of 4, the last one dropped
    rows = {}
    for t in TASKS:
        for h, part in enumerate((slice(0, half), slice(half, 2 * half))):
            grads = torch.autograd.grad(per_sample[t][part].mean(), params, retain_graph=True)
            rows[t, h] = torch.cat([g.reshape(-1) for g in grads])

    def cos(u, v):
        return float(u @ v / (u.norm() * v.norm()))

    def gms(u, v):
        return float(2 * u.norm() * v.norm() / (u.norm() ** 2 + v.norm() ** 2))

    assert observer.split_batch(per_sample, params) is True
    mtl.backward({t: v.mean() for t, v in per_sample.items()}, features=z)
    split = observer.last_record["split"]
    assert split["samples_per_half"] == half
    for t in TASKS:
        assert split["stl"][t]["cosine"] == pytest.approx(cos(rows[t, 0], rows[t, 1]))
        assert split["stl"][t]["magnitude_similarity"] == pytest.approx(gms(rows[t, 0], rows[t, 1]))
    want = (cos(rows["a", 0], rows["c", 0]) + cos(rows["a", 1], rows["c", 1])) / 2
    assert split["mtl"]["cosine"]["a"]["c"] == pytest.approx(want)
    conflicts = [
        float(rows[a, h] @ rows[b, h] < 0)
        for a, b in [("a", "b"), ("a", "c"), ("b", "c")]
        for h in (0, 1)
    ]
    assert split["mtl_conflict_rate"] == pytest.approx(sum(conflicts) / 6)
    stl_conflicts = [float(rows[t, 0] @ rows[t, 1] < 0) for t in TASKS]
    assert split["stl_conflict_rate"] == pytest.approx(sum(stl_conflicts) / 3)

    # The next call (index 1) is not recorded: nothing is measured.
    z, outputs = problem.model(problem.x)
    per_sample = {t: outputs[t].pow(2).mean(dim=1) for t in TASKS}
    assert observer.split_batch(per_sample, params) is False
    with pytest.raises(InputError, match="unknown task"):
        observer.split_batch({"nope": per_sample["a"]}, params)


def test_split_batch_statistics_refuses_too_small_batches():
    x = torch.ones(1, requires_grad=True)
    with pytest.raises(InputError, match="n >= 2"):
        stats.split_batch_statistics({"a": x * 2}, [x])


def test_split_batch_without_a_graph_is_an_input_error(problem):
    mtl = MTL({"tasks": TASKS, "plugins": ["gradstats"]}, shared=problem.model.encoder)
    with torch.no_grad():
        _, outputs = problem.model(problem.x)
    per_sample = {t: outputs[t].pow(2).mean(1) for t in TASKS}
    with pytest.raises(InputError, match=r"split_batch: .* with a graph \(not under torch.no_grad"):
        mtl.plugins["gradstats"].split_batch(per_sample, problem.model.encoder.parameters())


def test_group_matching_nothing_is_refused_at_construction(problem, tmp_path):
    log = tmp_path / "run.jsonl"
    config = {
        "tasks": TASKS,
        "plugins": [{"name": "gradstats", "groups": {"head": ["heads."]}, "jsonl": str(log)}],
    }
    with pytest.raises(
        ConfigError, match=r"groups \{'head': \['heads.'\]\} match no parameter.*0\.weight"
    ):
        MTL(config, shared=problem.model.encoder)
    assert not log.exists()
    # Space features has no parameter blocks to group.
    with pytest.raises(ConfigError, match=r"groups need .* space 'features'; pass shared="):
        MTL({"tasks": TASKS, "plugins": [{"name": "gradstats", "groups": {"g": ["0."]}}]})
    # The names are those of the space: in last_shared, the layer's path in the shared trunk.
    groups = {"w": ["2.weight"]}
    mtl = MTL(
        {
            "tasks": TASKS,
            "space": "last_shared",
            "plugins": [{"name": "gradstats", "groups": groups}],
        },
        shared=problem.model.encoder,
    )
    _, losses = problem.losses()
    mtl.backward(losses)
    assert set(mtl.plugins["gradstats"].last_record["groups"]) == {"w"}


def test_console_every_must_be_a_multiple_of_every():
    with pytest.raises(ConfigError, match="multiple of every"):
        MTL({"tasks": TASKS, "plugins": [{"name": "gradstats", "every": 3, "console_every": 4}]})


def test_skipped_step_then_normal_steps_widen_the_csv(problem, tmp_path):
    path = tmp_path / "stats.csv"
    config = {
        "tasks": TASKS,
        "on_nonfinite": "skip",
        "plugins": [{"name": "gradstats", "csv": str(path)}],
    }
    with MTL(config, shared=problem.model.encoder) as mtl:
        _, losses = problem.losses()
        mtl.backward(dict(losses, a=losses["a"] * float("nan")))
        _, losses = problem.losses()
        mtl.backward(losses)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["skipped"] for r in rows] == ["True", "False"]
    assert rows[0]["losses/a"] == "" and rows[0]["grad_norms/a"] == ""
    assert float(rows[1]["grad_norms/a"]) > 0
    assert rows[0]["reason"].startswith("non-finite loss")


def test_flatten_and_console_formatting_of_a_hand_record():
    record = {
        "step": 4,
        "space": "features",
        "skipped": False,
        "losses": {"a": 1.0, "b": 2.0},
        "weights": {"a": 1.0, "b": 0.5},
        "grad_norms": {"a": 3.0, "b": 4.0},
        "norm_imbalance": {"max_min_ratio": None, "coefficient_of_variation": 0.1},
        "cosine": {"a": {"b": -0.25}},
        "conflict_rate": 1.0,
    }
    flat = flatten(record)
    assert flat["cosine/a/b"] == -0.25 and flat["norm_imbalance/max_min_ratio"] is None
    stream = io.StringIO()
    ConsoleBackend(stream, every=2).write(record)
    ConsoleBackend(stream, every=3).write(record)  # 4 is not a multiple of 3: silent
    text = stream.getvalue()
    assert text.count("step 4") == 1 and "max/min inf" in text
    assert text.count("-0.25") == 2  # row a column b and row b column a


def test_csv_backend_writes_inf_as_empty(tmp_path):
    backend = CSVBackend(tmp_path / "x.csv")
    backend.write({"step": 0, "ratio": float("inf")})
    backend.close()
    assert (tmp_path / "x.csv").read_text().splitlines() == ["step,ratio", "0,"]


# -- logs are never lost or corrupted (issue 10 §4) ---------------------------------------------


def logged_run(problem, config, *, calls, state_after=None, resume=None):
    """Run ``calls`` backward calls of one MTL; return the state taken after ``state_after``
    calls. With ``resume``, load that state into the new MTL first."""
    saved = None
    with MTL(config, shared=problem.model.encoder) as mtl:
        if resume is not None:
            mtl.load_state_dict(resume)
        for call in range(calls):
            if state_after == call:
                saved = mtl.state_dict()
            _, losses = problem.losses()
            mtl.backward(losses)
            for p in problem.model.parameters():
                p.data.sub_(0.01 * p.grad)
            problem.zero_grad()
    return saved


def read_csv(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_resumed_run_keeps_earlier_records_and_does_not_repeat_later_ones(problem, tmp_path):
    jsonl, table = tmp_path / "run.jsonl", tmp_path / "run.csv"
    config = {
        "tasks": TASKS,
        "plugins": [{"name": "gradstats", "jsonl": str(jsonl), "csv": str(table)}],
    }
    # The first run logs steps 0..4; its checkpoint is taken after 3 calls; it then crashes
    # in the middle of writing a line.
    state = logged_run(problem, config, calls=5, state_after=3)
    first = [json.loads(line) for line in jsonl.read_text().splitlines()]
    first_rows = read_csv(table)
    with jsonl.open("a") as handle:
        handle.write('{"step": 5, "losses": {"a": 1.')
    with table.open("a") as handle:
        handle.write("5,params,Fal")
    # The resumed run starts again at step 3.
    logged_run(problem, config, calls=3, resume=state)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert records[:3] == first[:3]
    rows = read_csv(table)
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[:3] == first_rows[:3]
    assert float(rows[4]["grad_norms/a"]) == pytest.approx(records[4]["grad_norms"]["a"])


def test_a_fresh_run_replaces_an_old_log(problem, tmp_path):
    jsonl = tmp_path / "run.jsonl"
    config = {"tasks": TASKS, "plugins": [{"name": "gradstats", "jsonl": str(jsonl)}]}
    logged_run(problem, config, calls=4)
    logged_run(problem, config, calls=2)
    assert [json.loads(line)["step"] for line in jsonl.read_text().splitlines()] == [0, 1]


def test_the_csv_file_is_never_half_written_when_a_rewrite_is_interrupted(tmp_path, monkeypatch):
    """A kill while the wider header is written (here: the rename never happens) leaves the
    previous, complete file; nothing is ever truncated in place."""
    import os

    path = tmp_path / "x.csv"
    backend = CSVBackend(path)
    backend.write({"step": 0, "a": 1.0})
    backend.write({"step": 1, "a": 2.0})
    before = path.read_text()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # what a signal arriving just before the rename does

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        backend.write({"step": 2, "a": 3.0, "b": 4.0})
    assert path.read_text() == before
    monkeypatch.undo()
    backend.close()


def write_forever(path) -> None:
    backend = CSVBackend(path)
    for step in range(10**6):
        # A new column every 25 records: the file is rewritten often, with ever more rows.
        backend.write({"step": step, **{f"c{k}": float(step) for k in range(step // 25 + 1)}})


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_the_csv_file_stays_complete_when_the_writer_is_killed(tmp_path):
    """SIGKILL a process that writes records with a growing header at several moments; every
    time the file on disk is a complete CSV (at worst its last row cut off, which a resumed run
    drops)."""
    import os
    import signal
    import time

    path = tmp_path / "k.csv"
    for delay in (0.02, 0.1, 0.25, 0.5):
        child = os.fork()
        if child == 0:  # the writer: killed below, never returns
            try:
                write_forever(path)
            finally:
                os._exit(0)
        time.sleep(delay)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        if not path.exists():
            continue  # killed before its first record: nothing was written, nothing is lost
        text = path.read_text()
        assert text, f"empty file after a kill at {delay}s"
        lines = text.splitlines(keepends=True)
        complete = lines if text.endswith("\n") else lines[:-1]
        rows = list(csv.reader(complete))
        header = rows[0]
        assert header[0] == "step" and len(rows) >= 2
        assert all(len(row) == len(header) for row in rows[1:])
        assert [int(row[0]) for row in rows[1:]] == list(range(len(rows) - 1))


def test_two_outputs_on_one_path_are_refused_before_anything_is_built(
    problem, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    same = [
        [{"name": "gradstats", "jsonl": "out/x.log", "csv": "out/x.log"}],
        [
            {"name": "gradstats", "jsonl": "out/x.log"},
            {"name": "gradstats", "csv": "./out/../out/x.log"},
        ],
        [
            {"name": "gradstats", "jsonl": "out/x.log"},
            {"name": "gradstats", "jsonl": str(tmp_path / "out/x.log")},
        ],
    ]
    for plugins in same:
        with pytest.raises(ConfigError, match=r"both write .*x.log.*give each output its own path"):
            MTL({"tasks": TASKS, "plugins": plugins}, shared=problem.model.encoder)
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "link.log").symlink_to(tmp_path / "out" / "x.log")
    linked = [
        {"name": "gradstats", "jsonl": "out/x.log"},
        {"name": "gradstats", "jsonl": "link.log"},
    ]
    with pytest.raises(ConfigError, match="both write"):
        load_config({"tasks": TASKS, "plugins": linked})


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("jsonl", "", r"jsonl: an empty path; give a file name"),
        ("csv", "   ", r"csv: an empty path"),
        ("jsonl", ".", r"jsonl: '.' is a directory; give a file name"),
        ("csv", "{dir}", r"csv: '.*' is a directory"),
        ("jsonl", "{file}/run.jsonl", r"jsonl: '.*plain' is a file, so .* cannot be created"),
        ("jsonl", "x" * 300 + ".jsonl", r"jsonl: cannot use .*: a name too long"),
    ],
)
def test_bad_output_paths_are_refused_at_validation(tmp_path, option, value, message):
    plain = tmp_path / "plain"
    plain.write_text("")
    value = value.format(dir=tmp_path, file=plain)
    with pytest.raises(ConfigError, match=message):
        load_config({"tasks": TASKS, "plugins": [{"name": "gradstats", option: value}]})


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="uses /proc")
def test_an_unwritable_output_fails_at_construction_before_any_grad(problem):
    """/proc accepts no new file, even for root: the path passes validation (its directory
    exists) and must fail when the observer is built, never after `.grad` was written."""
    config = {"tasks": TASKS, "plugins": [{"name": "gradstats", "jsonl": "/proc/mtlhooks.jsonl"}]}
    load_config(config)
    with pytest.raises(OutputError, match=r"cannot write /proc/mtlhooks.jsonl"):
        MTL(config, shared=problem.model.encoder)
    assert all(p.grad is None for p in problem.model.parameters())


def test_task_names_holding_the_separator_give_distinct_columns(make_problem, tmp_path):
    """Without escaping, the pairs (a, b/c) and (a/b, c) both flatten to cosine/a/b/c."""
    tasks = ("a", "b/c", "a/b", "c%2F")
    problem = make_problem(tasks)
    table = tmp_path / "t.csv"
    config = {"tasks": tasks, "plugins": [{"name": "gradstats", "csv": str(table)}]}
    with MTL(config, shared=problem.model.encoder) as mtl:
        _, losses = problem.losses()
        mtl.backward(losses)
        record = mtl.plugins["gradstats"].last_record
    (row,) = read_csv(table)
    cosine = record["cosine"]
    assert float(row["cosine/a/b%2Fc"]) == pytest.approx(cosine["a"]["b/c"])
    assert float(row["cosine/a%2Fb/c%252F"]) == pytest.approx(cosine["a/b"]["c%2F"])
    pairs = sum(len(others) for others in cosine.values())
    assert len([k for k in row if k.startswith("cosine/")]) == pairs == 6


# -- what the console shows (issue 16) --------------------------------------------------------


def hand_record(tasks, *, seed=0):
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(len(tasks), 7, generator=generator, dtype=torch.float64)
    g = g * torch.logspace(0, 3, len(tasks), dtype=torch.float64)[:, None]
    from mtlhooks.plugins.gradstats import block_statistics

    record = {"step": 3, "space": "params", "skipped": False}
    record["losses"] = {t: float(i + 1) for i, t in enumerate(tasks)}
    record["weights"] = {t: 1.0 for t in tasks}
    record.update(block_statistics(g @ g.T, tuple(tasks)))
    return record


@pytest.mark.parametrize("width", [60, 80, 120, 200])
@pytest.mark.parametrize(
    "tasks",
    [
        ["a", "b", "c"],
        ["segmentation", "depth_estimation", "surface_normals"],
        [f"task_{i:02d}" for i in range(64)],
    ],
    ids=["short names", "long names", "64 tasks"],
)
def test_console_table_fits_the_width_and_keeps_its_columns_apart(tasks, width):
    import re

    text = ConsoleBackend.format(hand_record(tasks), width=width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    assert len(text) < 3000, "a record is a screenful, not a dump"
    header = next(line for line in lines if line.split()[:1] == ["task"])
    rows = [line for line in lines[lines.index(header) + 1 :] if line.lstrip()[:1] != "…"]
    assert "…" not in header and not any("…" in row for row in rows)
    # No two headings ran together: each is a separate column, and every row has one cell
    # per column (its own cosine left blank).
    headings = re.findall(
        r"cos #?\S+|min cos|mean cos|with|conflicts|loss|weight|w·\|g\||\|g\|", header
    )
    assert " ".join(headings) == " ".join(header.split()[1:])
    matrix = any(h.startswith("cos ") for h in headings)
    for row in rows:
        cells = row.split()[2:] if row.split()[0].startswith("#") else row.split()[1:]
        assert len(cells) == len(headings) - (1 if matrix else 0), row
    if len(tasks) > 16:
        assert len(rows) == 16 and "48 of 64 tasks not shown" in text


def test_console_table_shows_the_matrix_when_it_fits_and_a_summary_otherwise():
    record = hand_record(["a", "b", "c"])
    wide = ConsoleBackend.format(record, width=120)
    assert "cos a" in wide and "min cos" not in wide
    eight = hand_record([f"t{i}" for i in range(8)])
    summary = ConsoleBackend.format(eight, width=100)
    assert "cos t0" not in summary and "min cos with" in summary and "mean cos" in summary
    worst = min([f"t{i}" for i in range(1, 8)], key=lambda o: eight["cosine"]["t0"][o])
    row = next(line.split() for line in summary.splitlines() if line.split()[0] == "t0")
    assert row[5:7] == [f"{eight['cosine']['t0'][worst]:+.2f}", worst]
    negative = sum(eight["cosine"]["t0"][o] < 0 for o in eight["cosine"]["t0"])
    assert row[-1] == str(negative)
    compact = ConsoleBackend.format(record, width=70)
    assert "min cos conflicts" in compact and "with" not in compact
    long = hand_record(["segmentation", "depth_estimation"])
    numbered = ConsoleBackend.format(long, width=120)
    assert "cos #0" in numbered and "#1 depth_estimation" in numbered


def test_console_width_follows_the_terminal(monkeypatch):
    stream = io.StringIO()
    record = hand_record(["alpha", "beta", "gamma", "delta"])
    monkeypatch.setenv("COLUMNS", "50")
    ConsoleBackend(stream).write(record)
    assert max(len(line) for line in stream.getvalue().splitlines()) <= 50


def test_step_report_repr_is_one_screen(make_problem):
    tasks = tuple(f"task_{i}" for i in range(40))
    problem = make_problem(tasks)
    mtl = MTL({"tasks": tasks, "plugins": ["gradstats"]}, shared=problem.model.encoder)
    _, losses = problem.losses()
    report = mtl.backward(losses)
    text = repr(report)
    lines = text.splitlines()
    assert len(lines) <= 10 and max(len(line) for line in lines) <= 100
    assert lines[0] == "StepReport(step 0, space params, 40 tasks, written)"
    assert "task_0=" in text and "(+3" in text and "40×40 float64, 4 blocks" in text
    assert str(report) == text


def test_tensorboard_resume_purges_the_steps_recorded_again(tmp_path, monkeypatch):
    """TensorBoard drops events at or after `purge_step` of a new writer: a resumed run must
    open its writer with the resumed index. A stand-in writer records how it was opened."""
    import sys
    import types

    from mtlhooks.backends import TensorBoardBackend

    opened = []

    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            opened.append((log_dir, purge_step))
            self.closed = False

        def close(self):
            self.closed = True

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    backend = TensorBoardBackend(tmp_path)
    first = backend._writer
    backend.resume(7)
    assert opened == [(str(tmp_path), None), (str(tmp_path), 7)] and first.closed


def test_a_third_party_observer_declares_its_outputs_and_is_checked_too(registered, tmp_path):
    from mtlhooks import Family, Plugin, PluginConfig

    class DumpConfig(PluginConfig):
        path: str

    class Dump(Plugin):
        """Writes somewhere."""

        name = "test_dump"
        family = Family.OBSERVER
        Config = DumpConfig

        @classmethod
        def output_paths(cls, config):
            return {"path": config.path}

    registered(Dump)
    shared = str(tmp_path / "same.log")
    plugins = [{"name": "gradstats", "csv": shared}, {"name": "test_dump", "path": shared}]
    with pytest.raises(
        ConfigError, match=r"plugins\[1\] \(test_dump\) path and plugins\[0\] \(gradstats\) csv"
    ):
        load_config({"tasks": TASKS, "plugins": plugins})
