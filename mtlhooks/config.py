"""The validated configuration: pydantic models, file loading and the JSON schema.

A config names the tasks and lists plugins in the order they apply::

    tasks: [seg, depth]
    seed: 0
    on_nonfinite: raise        # or skip
    space: auto                # or none | features | last_shared | params
    plugins:
      - name: static
        weights: {seg: 1.0, depth: 0.5}
      - avgnorm                # a bare name takes the plugin's defaults
      - name: pcgrad
        reduction: mean
      - name: gradstats
        every: 10

Each plugin's options are validated by that plugin's own model (unknown keys are errors).
Parsing is strict: a value must have the type of its field (``every: "5"``, ``every: true`` and
``seed: 3.0`` are errors, not 5, 1 and 3; an integer is a valid float), floats must be finite,
and a key may appear only once in a mapping of a file. Every error is a :class:`ConfigError`
naming the plugin, the field, the value and what is allowed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mtlhooks import registry
from mtlhooks.errors import ConfigError
from mtlhooks.plugin import Family, Need, PluginConfig, Space

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class PluginEntry(BaseModel):
    """One configured plugin: its name and its validated options."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    options: PluginConfig

    @property
    def info(self) -> registry.PluginInfo:
        return registry.get_plugin(self.name)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.options.model_dump(mode="json")}


def _describe_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "value_error":
            # Our own validators already name the place and the value.
            message = message.removeprefix("Value error, ")
            lines.append(message if message.startswith(f"{where}[") else f"{where}: {message}")
            continue
        value = item.get("input")
        shown = "" if isinstance(value, (dict, list, tuple)) else f" (got {value!r})"
        lines.append(f"{where}: {message}{shown}")
    return "; ".join(lines)


def _parse_plugin(raw: object, position: int) -> PluginEntry:
    if isinstance(raw, PluginEntry):
        return raw
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str):
        raise ValueError(
            f"plugins[{position}]: expected a plugin name or a mapping with a 'name' key, "
            f"got {raw!r}"
        )
    options = {key: value for key, value in raw.items() if key != "name"}
    name = raw["name"]
    try:
        info = registry.get_plugin(name)
    except ConfigError as error:
        raise ValueError(f"plugins[{position}]: {error}") from None
    try:
        parsed = info.config_model.model_validate(options)
    except ValidationError as error:
        fields = ", ".join(info.config_model.model_fields) or "none"
        raise ValueError(
            f"plugins[{position}] ({name}): {_describe_errors(error)}. Fields of {name!r}: {fields}"
        ) from None
    return PluginEntry(name=name, options=parsed)


class MTLConfig(BaseModel):
    """The whole configuration of one :class:`mtlhooks.MTL`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    tasks: tuple[str, ...] = Field(
        min_length=1, description="Task names, in the order weights and Gramians use."
    )
    plugins: tuple[PluginEntry, ...] = Field(
        default=(), description="Plugins in the order they apply (observers always run last)."
    )
    space: Literal["auto", "none", "features", "last_shared", "params"] = Field(
        default="auto",
        description="Where per-task gradients are taken; 'auto' decides from the plugins.",
    )
    on_nonfinite: Literal["raise", "skip"] = Field(
        default="raise",
        description="A NaN/inf loss or Gramian: raise NonFiniteError, or skip the step "
        "(no gradient written, observers told).",
    )
    seed: int = Field(
        default=0,
        ge=0,
        lt=2**64,
        description="Seed of the generator of every random choice (0 ≤ seed < 2**64, the range "
        "of torch.Generator.manual_seed).",
    )
    params_gramian: Literal["auto", "materialize", "layerwise"] = Field(
        default="auto",
        description="Space 'params': 'materialize' holds the T×P per-task gradients; "
        "'layerwise' builds the Gramian layer by layer from the shared nn.Linear layers' inputs "
        "and output gradients (never holds T×P; then one weighted backward); 'auto' takes "
        "layerwise when it holds less memory, linear layers hold over 99% of the shared "
        "parameters, the call is not accumulating, and no plugin reads J.",
    )
    sync: Literal["exact", "gramian"] = Field(
        default="exact",
        description="Space 'params' across processes: 'exact' all-reduces the per-task gradients "
        "(T× the usual traffic; equals one process on the global batch); 'gramian' all-reduces "
        "only the T×T Gramians and lets DDP sync one weighted backward (approximate weights).",
    )
    check_gradients: bool = Field(
        default=True,
        description="Check every gradient a call writes for NaN/inf (then follow on_nonfinite, "
        "with .grad put back): one read of the written gradients per call, a few percent of a "
        "small model's step on a CPU. false checks only the losses, the weights and the "
        "Gramian: a non-finite gradient of a finite loss (a sqrt at 0 in the graph) then "
        "reaches .grad. Under a loss_scale the GradScaler checks the gradients either way.",
    )
    task_specific: Literal["aggregated", "weighted", "unweighted"] = Field(
        default="aggregated",
        description="What the task-specific parameters (heads) receive: 'aggregated' Σ αᵢwᵢ∇Lᵢ "
        "(the weights of the shared update), 'weighted' Σ wᵢ∇Lᵢ (loss scaling and norm "
        "balancing, no aggregator weights), 'unweighted' Σ ∇Lᵢ (TorchJD's and LibMTL's "
        "convention). The shared parameters always receive Σ αᵢwᵢ∇Lᵢ. Other than 'aggregated', "
        "the heads are told apart by z: pass features=z to backward() (space 'params' with "
        "sync: exact needs no z: every parameter outside shared= is task-specific).",
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks_as_tuple(cls, raw: object) -> object:
        # Files give lists; strict parsing would otherwise refuse them for a tuple field.
        return tuple(raw) if isinstance(raw, list) else raw

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        empty = [t for t in tasks if not t.strip()]
        if empty:
            raise ValueError("task names must be non-empty strings")
        duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
        if duplicates:
            raise ValueError(f"task names must be unique; repeated: {duplicates}")
        return tasks

    @field_validator("plugins", mode="before")
    @classmethod
    def _resolve_plugins(cls, raw: object) -> tuple[PluginEntry, ...]:
        if raw is None:
            return ()
        if isinstance(raw, (str, bytes)) or not isinstance(raw, (list, tuple)):
            raise ValueError(f"plugins must be a list, got {type(raw).__name__}")
        return tuple(_parse_plugin(item, position) for position, item in enumerate(raw))

    @model_validator(mode="after")
    def _check_combination(self) -> MTLConfig:
        aggregators = [p.name for p in self.plugins if p.info.family is Family.AGGREGATOR]
        if len(aggregators) > 1:
            raise ValueError(
                f"at most one aggregator may be configured, got {aggregators}; keep one"
            )
        for position, entry in enumerate(self.plugins):
            try:
                entry.info.cls.check_config(entry.options, self.tasks)
            except ValueError as error:
                raise ValueError(f"plugins[{position}] ({entry.name}): {error}") from None
        gradient_users = self.gradient_plugins()
        if self.space == "none" and gradient_users:
            names = [p.name for p in gradient_users]
            raise ValueError(
                f"space 'none' takes no per-task gradient, but {names} need them; "
                "use space 'auto' or one they support"
            )
        if self.space not in ("auto", "none"):
            for entry in gradient_users:
                allowed = [s.value for s in entry.info.spaces]
                if Space(self.space) not in entry.info.spaces:
                    raise ValueError(
                        f"plugin {entry.name!r} cannot work in space {self.space!r}; "
                        f"it supports {allowed}"
                    )
        elif gradient_users and not self.common_spaces():
            listing = {p.name: [s.value for s in p.info.spaces] for p in gradient_users}
            raise ValueError(f"no gradient space suits every plugin: {listing}")
        _check_output_paths(self.plugins)
        return self

    def gradient_plugins(self) -> list[PluginEntry]:
        """Configured plugins that read per-task gradients."""
        return [p for p in self.plugins if p.info.needs is not Need.NOTHING]

    def common_spaces(self) -> list[Space]:
        """Spaces every gradient-reading plugin supports, in the order of ``Space``."""
        users = self.gradient_plugins()
        return [s for s in Space if s is not Space.NONE and all(s in p.info.spaces for p in users)]

    def resolve_space(self, *, shared: bool, last_shared: bool) -> Space:
        """The gradient space of an MTL built from this config, given whether it receives
        parameters for space ``params`` (``shared=``) and for ``last_shared`` (``last_shared=``,
        or a ``shared=`` module, whose last layer is taken). ``space: auto`` takes the common
        first choice of the gradient-reading plugins that are not observers (observers vote
        only when they are alone), else the most exact space they all support and the call
        can provide; without gradient-reading plugins, ``none``.

        :raises ConfigError: when the space cannot be provided (the message says what to pass).
        """
        available = {Space.NONE, Space.FEATURES}
        if shared:
            available.add(Space.PARAMS)
        if last_shared:
            available.add(Space.LAST_SHARED)
        users = self.gradient_plugins()
        voters = [e for e in users if e.info.family is not Family.OBSERVER] or users
        if self.space != "auto":
            space = Space(self.space)
        elif not users:
            space = Space.NONE
        else:
            common = [s for s in self.common_spaces() if s in available]
            if not common:
                names = [entry.name for entry in users]
                raise ConfigError(
                    f"plugins {names} need per-task gradients in one of "
                    f"{[s.value for s in self.common_spaces()]}: pass shared= (and "
                    "last_shared=) to MTL, or features= to backward() with space 'features'"
                )
            firsts = {entry.info.spaces[0] for entry in voters}
            if len(firsts) == 1 and next(iter(firsts)) in common:
                space = next(iter(firsts))
            else:
                space = next(s for s in _EXACTNESS if s in common)
        if space not in available:
            needed = "shared=" if space is Space.PARAMS else "last_shared= (or a shared= module)"
            raise ConfigError(f"space {space.value!r} needs {needed} when building MTL")
        return space

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping that :func:`load_config` turns back into an equal config."""
        data = self.model_dump(mode="json", exclude={"plugins"})
        data["plugins"] = [p.as_dict() for p in self.plugins]
        return data


_EXACTNESS = (Space.PARAMS, Space.LAST_SHARED, Space.FEATURES)
"""Order of preference of ``space: auto`` when the plugins' first choices differ: most exact
first."""


def _check_output_paths(plugins: tuple[PluginEntry, ...]) -> None:
    """Refuse two outputs on one path: two plugins, or two options of one plugin, writing the
    same file or directory would interleave or overwrite each other's records."""
    owners: dict[str, str] = {}
    for position, entry in enumerate(plugins):
        for option, path in entry.info.cls.output_paths(entry.options).items():
            where = f"plugins[{position}] ({entry.name}) {option}"
            key = os.path.normcase(os.path.realpath(path))
            if key in owners:
                raise ValueError(
                    f"{where} and {owners[key]} both write {path!r}: give each output its own path"
                )
            owners[key] = where


class _DuplicateKey(Exception):
    def __init__(self, key: object, line: int, first_line: int) -> None:
        super().__init__(key, line, first_line)
        self.key, self.line, self.first_line = key, line, first_line


class _StrictYAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two changes: a key repeated in one mapping is an error (PyYAML
    keeps the last silently), and ``1e-8`` is a float, as in YAML 1.2 and JSON (PyYAML follows
    YAML 1.1, where a float needs a dot and a signed exponent, and reads ``1e-8`` as a string)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        if isinstance(node, yaml.MappingNode):
            first_lines: dict[object, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults` merges are overridden on purpose
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # the base class reports unhashable keys
                line = key_node.start_mark.line + 1
                if key in first_lines:
                    raise _DuplicateKey(key, line, first_lines[key])
                first_lines[key] = line
        return super().construct_mapping(node, deep=deep)


_StrictYAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)

_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]')


def _json_duplicate_key(text: str) -> _DuplicateKey | None:
    """The first key repeated within one object of valid JSON text, with its lines (the
    standard library keeps the last value silently and does not say where keys are)."""
    objects: list[dict[str, int] | None] = []  # one entry per open bracket; None for arrays
    last_string: tuple[str, int] | None = None
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token.startswith('"'):
            last_string = (json.loads(token), match.start())
            continue
        if token in "{[":
            objects.append({} if token == "{" else None)
        elif token in "}]":
            objects.pop()
        elif token == ":" and last_string is not None and objects and objects[-1] is not None:
            key, offset = last_string
            line = text.count("\n", 0, offset) + 1
            keys = objects[-1]
            if key in keys:
                return _DuplicateKey(key, line, keys[key])
            keys[key] = line
        last_string = None
    return None


def _parse_text(text: str, suffix: str) -> object:
    if suffix in (".yaml", ".yml"):
        return yaml.load(text, Loader=_StrictYAMLLoader)  # a SafeLoader: no arbitrary objects
    if suffix == ".toml":
        return tomllib.loads(text)  # refuses repeated keys itself, with the line
    data = json.loads(text)
    duplicate = _json_duplicate_key(text)
    if duplicate is not None:
        raise duplicate
    return data


def _read_file(path: Path) -> object:
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(
            f"{path}: unknown config format {suffix!r}; use .yaml, .yml, .toml or .json"
        )
    try:
        # utf-8-sig: a byte-order mark (as some Windows editors write) is accepted in every
        # format alike.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    try:
        return _parse_text(text, suffix)
    except _DuplicateKey as duplicate:
        raise ConfigError(
            f"{path}:{duplicate.line}: duplicate key {duplicate.key!r} (first at line "
            f"{duplicate.first_line}); a key may appear only once in a mapping"
        ) from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: cannot parse {suffix[1:].upper()}: {error}") from None


def _shortened(path: Path, limit: int = 80) -> str:
    text = str(path)
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}… ({len(text)} characters)"


def load_config(source: MTLConfig | Mapping[str, Any] | str | Path) -> MTLConfig:
    """Build a validated :class:`MTLConfig` from a config, a mapping or a YAML/TOML/JSON file.

    Raises :class:`ConfigError` with every problem found, each naming where it is.
    """
    if isinstance(source, MTLConfig):
        return source
    origin = "config"
    data: object = source
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            found = path.is_file()
        except OSError as error:  # a name too long for the file system, say
            raise ConfigError(
                f"cannot use {_shortened(path)} as a config path: {error.strerror or error}"
            ) from None
        if not found:
            if path.is_dir():
                raise ConfigError(f"{path} is a directory, not a config file")
            raise ConfigError(f"config file not found: {path}")
        origin = str(path)
        data = _read_file(path)
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{origin}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return MTLConfig.model_validate(dict(data))
    except ValidationError as error:
        raise ConfigError(f"{origin}: {_describe_errors(error)}") from None


def config_json_schema() -> dict[str, Any]:
    """JSON schema of config files, with every installed plugin's options, for editors and CI."""
    schema = MTLConfig.model_json_schema()
    variants: list[dict[str, Any]] = []
    for info in registry.available_plugins():
        plugin_schema = info.config_model.model_json_schema()
        properties = {"name": {"const": info.name}, **plugin_schema.get("properties", {})}
        variant: dict[str, Any] = {
            "type": "object",
            "title": info.name,
            "description": info.summary,
            "properties": properties,
            "required": ["name", *plugin_schema.get("required", [])],
            "additionalProperties": False,
        }
        for key in ("$defs",):
            if key in plugin_schema:
                schema.setdefault("$defs", {}).update(plugin_schema[key])
        variants.append(variant)
        variants.append({"const": info.name})
    schema["properties"]["plugins"] = {
        "type": "array",
        "description": MTLConfig.model_fields["plugins"].description,
        "items": {"anyOf": variants},
    }
    schema.get("$defs", {}).pop("PluginEntry", None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
