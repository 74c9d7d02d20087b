"""The gradstats observer and its backends: every number read back from what was written and
compared with plain autograd."""

from __future__ import annotations

import builtins
import csv
import io
import json
import math

import pytest
import torch

from mtlhooks import MTL, ConfigError, InputError, Space, stats
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
    with pytest.raises(TypeError, match="no log"):
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


def test_tensorboard_missing_is_a_clear_error_at_construction(problem, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    config = {"tasks": TASKS, "plugins": [{"name": "gradstats", "tensorboard": str(tmp_path)}]}
    with pytest.raises(ImportError, match=r"pip install \"mtlhooks\[tensorboard\]\""):
        MTL(config, shared=problem.model.encoder)


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
    with pytest.raises(ValueError, match="n >= 2"):
        stats.split_batch_statistics({"a": x * 2}, [x])


def test_group_matching_nothing_is_an_error_naming_the_blocks(problem):
    mtl = MTL(
        {"tasks": TASKS, "plugins": [{"name": "gradstats", "groups": {"head": ["heads."]}}]},
        shared=problem.model.encoder,
    )
    _, losses = problem.losses()
    with pytest.raises(InputError, match=r"groups \['head'\] match no block.*0\.weight"):
        mtl.backward(losses)


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
