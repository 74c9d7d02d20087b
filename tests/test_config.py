"""Config loading and validation: every bad config names the plugin, the field and the fix."""

from __future__ import annotations

import json
import re

import pytest
from torch import nn

from mtlhooks import MTL, load_config
from mtlhooks.config import config_json_schema
from mtlhooks.errors import ConfigError

TASKS = ["seg", "depth"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"tasks": TASKS, "plugins": ["nope"]},
            r"unknown plugin 'nope'; known plugins: .*avgnorm, .*static",
        ),
        (
            {"tasks": TASKS, "plugins": [{"name": "pcgrad", "reduce": "sum"}]},
            r"plugins\[0\] \(pcgrad\): reduce: Extra inputs are not permitted.*Fields of 'pcgrad': "
            r"reduction",
        ),
        (
            {"tasks": TASKS, "plugins": [{"name": "pcgrad", "reduction": "avg"}]},
            r"\(pcgrad\): reduction: Input should be 'sum' or 'mean' \(got 'avg'\)",
        ),
        (
            {"tasks": TASKS, "plugins": [{"name": "avgnorm", "ema": "fast"}]},
            r"\(avgnorm\): ema: Input should be a valid number.*\(got 'fast'\)",
        ),
        (
            {"tasks": TASKS, "plugins": [{"name": "avgnorm", "ema": 1.5}]},
            r"\(avgnorm\): ema: Input should be less than 1 \(got 1.5\)",
        ),
        (
            {"tasks": TASKS, "plugins": [{"name": "gradstats", "every": 0}]},
            r"\(gradstats\): every: Input should be greater than or equal to 1",
        ),
        (
            {"tasks": TASKS, "plugins": [{"name": "static", "weights": {"sge": 1.0}}]},
            r"\(static\): field 'weights': unknown task\(s\) \['sge'\]; tasks are",
        ),
        (
            {"tasks": TASKS, "plugins": [{"name": "static", "weights": {"seg": -1.0}}]},
            r"\(static\): weights: weights must be finite and >= 0, got \{.seg.: -1.0\}",
        ),
        (
            {"tasks": TASKS, "plugins": ["pcgrad", "mgda"]},
            r"at most one aggregator.*\['pcgrad', 'mgda'\]",
        ),
        ({"tasks": TASKS, "space": "none", "plugins": ["mgda"]}, r"space 'none' takes no per-task"),
        ({"tasks": TASKS, "space": "grads"}, r"space: Input should be 'auto', 'none'"),
        (
            {"tasks": TASKS, "on_nonfinite": "ignore"},
            r"on_nonfinite: Input should be 'raise' or 'skip'",
        ),
        ({"tasks": []}, r"tasks: Tuple should have at least 1 item"),
        ({"tasks": ["a", "a"]}, r"task names must be unique; repeated: \['a'\]"),
        ({"tasks": TASKS, "plugin": []}, r"plugin: Extra inputs are not permitted"),
        ({"plugins": []}, r"tasks: Field required"),
        ({"tasks": TASKS, "plugins": [{"weights": {}}]}, r"plugins\[0\]: expected a plugin name"),
        ({"tasks": TASKS, "plugins": "static"}, r"plugins must be a list"),
    ],
)
def test_bad_config_is_named(config, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_space_the_call_cannot_provide_is_refused():
    with pytest.raises(ConfigError, match=r"space 'params' needs shared="):
        MTL({"tasks": TASKS, "plugins": ["pcgrad"], "space": "params"})
    with pytest.raises(ConfigError, match=r"space 'last_shared' needs last_shared="):
        MTL({"tasks": TASKS, "plugins": ["avgnorm"], "space": "last_shared"})


def test_auto_space_without_shared_falls_back_to_features():
    assert MTL({"tasks": TASKS, "plugins": ["mgda"]}).space.value == "features"


def test_auto_space_prefers_the_plugins_common_first_choice(problem):
    shared = problem.model.encoder
    tasks = problem.tasks
    assert MTL({"tasks": tasks, "plugins": ["avgnorm"]}, shared=shared).space.value == "last_shared"
    assert MTL({"tasks": tasks, "plugins": ["pcgrad"]}, shared=shared).space.value == "params"
    mixed = MTL({"tasks": tasks, "plugins": ["avgnorm", "pcgrad"]}, shared=shared)
    assert mixed.space.value == "params"
    assert MTL({"tasks": tasks, "plugins": ["static"]}, shared=shared).space.value == "none"


YAML = """
tasks: [seg, depth]
seed: 3
plugins:
  - name: static
    weights: {seg: 2.0}
  - avgnorm
  - name: pcgrad
    reduction: mean
"""

TOML = """
tasks = ["seg", "depth"]
seed = 3

[[plugins]]
name = "static"
weights = {seg = 2.0}

[[plugins]]
name = "avgnorm"

[[plugins]]
name = "pcgrad"
reduction = "mean"
"""


def test_yaml_toml_json_and_dict_load_the_same_config(tmp_path):
    (tmp_path / "c.yaml").write_text(YAML)
    (tmp_path / "c.toml").write_text(TOML)
    from_yaml = load_config(tmp_path / "c.yaml")
    (tmp_path / "c.json").write_text(json.dumps(from_yaml.to_dict()))
    from_toml = load_config(str(tmp_path / "c.toml"))
    from_json = load_config(tmp_path / "c.json")
    from_dict = load_config(from_yaml.to_dict())
    assert from_yaml.to_dict() == from_toml.to_dict() == from_json.to_dict() == from_dict.to_dict()
    assert [p.name for p in from_yaml.plugins] == ["static", "avgnorm", "pcgrad"]
    assert from_yaml.plugins[2].options.reduction == "mean"


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [a\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: cannot parse YAML"):
        load_config(bad)
    other = tmp_path / "c.ini"
    other.write_text("x")
    with pytest.raises(ConfigError, match=r"unknown config format '.ini'"):
        load_config(other)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(listing)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("tasks: [a, b]\nplugins: [{name: mgda, normalization: l3}]\n")
    with pytest.raises(
        ConfigError,
        match=r"wrong.yaml: plugins\[0\] \(mgda\): normalization: Input should be 'none'",
    ):
        load_config(wrong)


def test_json_schema_lists_every_plugin_with_its_fields():
    schema = config_json_schema()
    variants = schema["properties"]["plugins"]["items"]["anyOf"]
    titled = {v["title"]: v for v in variants if "title" in v}
    assert {"static", "avgnorm", "pcgrad", "mgda", "gradstats"} <= set(titled)
    assert titled["pcgrad"]["properties"]["reduction"]["enum"] == ["sum", "mean"]
    assert titled["pcgrad"]["additionalProperties"] is False
    assert schema["required"] == ["tasks"]


# -- strict parsing (issue 16) and early errors (issue 10 §3) --------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tasks: [a, b]\nplugins: [{name: gradstats, every: true}]\n", r"every: .*valid integer"),
        ('tasks: [a, b]\nplugins: [{name: gradstats, every: "5"}]\n', r"every: .*valid integer"),
        ("tasks: [a, b]\nplugins: [{name: gradstats, every: 5.0}]\n", r"every: .*valid integer"),
        ('tasks: [a, b]\nseed: "3"\n', r"seed: Input should be a valid integer \(got '3'\)"),
        ("tasks: [a, b]\nseed: 3.0\n", r"seed: Input should be a valid integer"),
        ("tasks: [a, b]\nseed: true\n", r"seed: Input should be a valid integer"),
        ("tasks: [a, b]\nplugins: [{name: static, normalize: 1}]\n", r"normalize: .*boolean"),
        ('tasks: [a, b]\nplugins: [{name: avgnorm, ema: "0.5"}]\n', r"ema: .*valid number"),
        ("tasks: [a, 1]\n", r"tasks.1: Input should be a valid string"),
    ],
)
def test_values_must_have_their_fields_type(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_an_integer_is_a_valid_float_and_yaml_exponents_are_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tasks: [a, b]\nplugins: [{name: avgnorm, ema: 0, eps: 1e-8}]\n")
    options = load_config(path).plugins[0].options
    assert options.ema == 0.0 and isinstance(options.ema, float)
    assert options.eps == 1e-8  # PyYAML alone reads `1e-8` as the string "1e-8"


def float_fields() -> list[tuple[str, str, object]]:
    """(plugin, field, a value holding a non-finite float) for every float option of every
    installed plugin: plain floats, optional floats and mappings of floats."""
    from mtlhooks import registry

    cases = []
    for info in registry.available_plugins():
        schema = info.config_model.model_json_schema()
        for name, field in schema.get("properties", {}).items():
            variants = field.get("anyOf", [field])
            if any(v.get("type") == "number" for v in variants):
                cases.append((info.name, name, float("inf")))
            elif any(
                isinstance(v.get("additionalProperties"), dict)
                and v["additionalProperties"].get("type") == "number"
                for v in variants
            ):
                cases.append((info.name, name, {"a": float("nan"), "b": 1.0}))
    return cases


@pytest.mark.parametrize(("plugin", "field", "value"), float_fields())
def test_non_finite_floats_are_refused_in_every_plugin_option(plugin, field, value):
    with pytest.raises(ConfigError, match=rf"\({plugin}\): {field}.*finite number"):
        load_config({"tasks": ["a", "b"], "plugins": [{"name": plugin, field: value}]})


def test_non_finite_floats_are_found_in_each_file_format(tmp_path):
    texts = {
        "c.yaml": "tasks: [a, b]\nplugins: [{name: cagrad, c: .inf}]\n",
        "c.toml": 'tasks = ["a", "b"]\n[[plugins]]\nname = "cagrad"\nc = inf\n',
        "c.json": '{"tasks": ["a", "b"], "plugins": [{"name": "cagrad", "c": Infinity}]}',
    }
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=r"\(cagrad\): c: Input should be a finite number"):
            load_config(tmp_path / name)


def test_seed_must_fit_the_generator_and_the_largest_one_runs(problem):
    with pytest.raises(ConfigError, match=r"seed: Input should be less than 18446744073709551616"):
        load_config({"tasks": ["a"], "seed": 2**64})
    mtl = MTL(
        {"tasks": problem.tasks, "seed": 2**64 - 1, "plugins": ["pcgrad"]},
        shared=problem.model.encoder,
    )
    _, losses = problem.losses()
    assert not mtl.backward(losses).skipped


@pytest.mark.parametrize(
    ("name", "text", "line", "first"),
    [
        ("top.yaml", "tasks: [a, b]\nseed: 1\nseed: 2\n", 3, 2),
        (
            "nested.yaml",
            "tasks: [a, b]\nplugins:\n  - name: gradstats\n    every: 2\n    every: 3\n",
            5,
            4,
        ),
        ("top.json", '{"tasks": ["a", "b"],\n "seed": 1,\n "seed": 2}', 3, 2),
        (
            "nested.json",
            '{"tasks": ["a", "b"],\n "plugins": [{"name": "gradstats",\n'
            '   "every": 2, "every": 3}]}',
            3,
            3,
        ),
    ],
)
def test_duplicate_keys_are_refused_with_their_line(tmp_path, name, text, line, first):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(
        ConfigError, match=rf"{name}:{line}: duplicate key .* \(first at line {first}\)"
    ):
        load_config(path)


def test_duplicate_keys_in_toml_and_repeated_values_are_told_apart(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('tasks = ["a", "b"]\nseed = 1\nseed = 2\n')
    with pytest.raises(ConfigError, match=r"cannot parse TOML: .*line 3"):
        load_config(toml)
    # The same key in two different mappings, or a key equal to a value, is fine.
    fine = tmp_path / "fine.json"
    fine.write_text(
        '{"tasks": ["every", "b"], "plugins": [{"name": "gradstats", "every": 2},'
        ' {"name": "static", "weights": {"every": 1.0}}]}'
    )
    assert load_config(fine).tasks == ("every", "b")


def test_a_byte_order_mark_is_accepted_in_every_format(tmp_path):
    bom = "\ufeff"
    texts = {
        "c.yaml": "tasks: [a, b]\nseed: 4\n",
        "c.toml": 'tasks = ["a", "b"]\nseed = 4\n',
        "c.json": '{"tasks": ["a", "b"], "seed": 4}',
    }
    for name, text in texts.items():
        (tmp_path / name).write_text(bom + text, encoding="utf-8")
        assert load_config(tmp_path / name).seed == 4


def test_unreadable_config_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot use .*… \(5005 characters\) as a config path"):
        load_config("x" * 5000 + ".yaml")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("tasks: [caf\xe9]\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 text"):
        load_config(latin)


def documented_configs() -> list[tuple[str, str]]:
    """Every config the documentation shows: the README's YAML block, the YAML example of the
    config module's docstring, and the gradstats options of docs/reproducing.md (given tasks,
    its groups named for a model with layers 0, 2 and 6, its TensorBoard output left out where
    tensorboard is not installed)."""
    import re

    import mtlhooks.config
    from mtlhooks import docs
    from mtlhooks.backends import tensorboard_installed

    readme = (docs.ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [("README.md", b) for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)]
    docstring = mtlhooks.config.__doc__ or ""
    example = docstring.split("::\n", 1)[1].split("\n\n", 1)[0]
    blocks.append(("mtlhooks/config.py", "\n".join(line[4:] for line in example.splitlines())))
    reproducing = (docs.ROOT / "docs" / "reproducing.md").read_text(encoding="utf-8")
    section = reproducing.split("## Checking the claims on your own model", 1)[1]
    snippet = section.split("\n\n", 2)[1]
    lines = [line[4:] for line in snippet.splitlines()]
    if not tensorboard_installed():
        lines = [line for line in lines if not line.lstrip().startswith("tensorboard:")]
    blocks.append(("docs/reproducing.md", "tasks: [a, b, c]\n" + "\n".join(lines)))
    return blocks


class SixLayerTrunk(nn.Module):
    """A trunk whose parameters are named 0.*, 2.*, 4.* and 6.*, like docs/reproducing.md's."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(5, 8),
            nn.Tanh(),
            nn.Linear(8, 8),
            nn.Tanh(),
            nn.Linear(8, 8),
            nn.Tanh(),
            nn.Linear(8, 6),
        )


@pytest.mark.parametrize(("where", "text"), documented_configs())
def test_documented_configs_load_in_every_format_and_run(
    where, text, tmp_path, monkeypatch, make_problem
):
    import yaml

    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(text)
    (tmp_path / "c.yaml").write_text(text)
    (tmp_path / "c.json").write_text(json.dumps(data))
    configs = [
        load_config(tmp_path / "c.yaml"),
        load_config(tmp_path / "c.json"),
        load_config(data),
    ]
    assert configs[0].to_dict() == configs[1].to_dict() == configs[2].to_dict()
    problem = make_problem(tuple(data["tasks"]))
    problem.model.encoder = SixLayerTrunk().double().encoder
    with MTL(configs[0], shared=problem.model.encoder) as mtl:
        _, losses = problem.losses()
        assert not mtl.backward(losses).skipped, where


SPACE_CASES = [
    [],
    ["static"],
    ["pcgrad"],
    ["avgnorm"],
    ["avgnorm", "pcgrad"],
    ["gradstats"],
    ["static", "gradstats"],
    ["avgnorm", "gradstats"],
    ["graddrop"],
    ["graddrop", "gradstats"],
    ["gradnorm", "mgda"],
]


@pytest.mark.parametrize("plugins", SPACE_CASES)
@pytest.mark.parametrize("given", ["shared module", "last_shared only", "nothing"])
def test_resolve_space_agrees_with_what_mtl_builds(plugins, given, problem):
    """`mtlhooks validate` tells the space from the config alone: it must be the one MTL takes."""
    config = load_config({"tasks": problem.tasks, "plugins": plugins})
    encoder = problem.model.encoder
    kwargs = {
        "shared module": {"shared": encoder},
        "last_shared only": {"last_shared": encoder[2]},
        "nothing": {},
    }[given]
    flags = {"shared": "shared" in kwargs, "last_shared": bool(kwargs)}
    try:
        built = MTL(config, **kwargs).space
    except ConfigError as error:
        with pytest.raises(ConfigError, match=re.escape(str(error))):
            config.resolve_space(**flags)
        return
    assert config.resolve_space(**flags) is built
