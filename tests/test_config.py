"""Config loading and validation: every bad config names the plugin, the field and the fix."""

from __future__ import annotations

import json

import pytest

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
