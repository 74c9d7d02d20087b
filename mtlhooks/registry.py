"""Finding plugins by name: every plugin is an entry point of the group ``mtlhooks.plugins``.

The built-ins are declared that way too, in mtlhooks' own ``pyproject.toml``; a third-party
package adds a method the same way, without touching mtlhooks::

    # its pyproject.toml
    [project.entry-points."mtlhooks.plugins"]
    my_weights = "my_package.weights:MyWeights"

Every plugin class is checked when it is first resolved (at config load, never mid-training):
it must subclass :class:`mtlhooks.Plugin`, carry the name it is registered under, and implement
only hooks of :mod:`mtlhooks.hookspecs` with arguments those hooks have.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from dataclasses import dataclass
from importlib import metadata

import pluggy

from mtlhooks import hookspecs
from mtlhooks.errors import ConfigError, PluginError
from mtlhooks.method import MethodSpec
from mtlhooks.plugin import PROJECT, Family, Need, Plugin, PluginConfig, Space

ENTRY_POINT_GROUP = "mtlhooks.plugins"

DISTRIBUTION = "mtlhooks"


def _own_entry_points() -> dict[str, str]:
    """name → ``module:Class`` of the entry points that mtlhooks' own distribution declares."""
    try:
        distribution = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return {}
    return {
        entry_point.name: entry_point.value
        for entry_point in distribution.entry_points
        if entry_point.group == ENTRY_POINT_GROUP
    }


BUILTINS: dict[str, str] = _own_entry_points()
"""Built-in plugins: name → ``module:Class`` (imported on first use). They are declared like any
third-party plugin, as entry points of the group ``mtlhooks.plugins`` in mtlhooks' own
``pyproject.toml``, and read from the installed package's metadata: adding a built-in method is
one new file plus one line there (then ``pip install -e .`` again to refresh the metadata)."""


@dataclass(frozen=True)
class PluginInfo:
    """A plugin class found by name, and where it came from."""

    name: str
    cls: type[Plugin]
    source: str
    """``"builtin"`` or ``"entry point <value> (<distribution>)"``."""

    @property
    def family(self) -> Family:
        return self.cls.family

    @property
    def config_model(self) -> type[PluginConfig]:
        return self.cls.Config

    @property
    def spaces(self) -> tuple[Space, ...]:
        return self.cls.spaces

    @property
    def needs(self) -> Need:
        return self.cls.needs

    @property
    def summary(self) -> str:
        """The first paragraph of the class docstring, on one line."""
        paragraph = (self.cls.__doc__ or "").strip().split("\n\n")[0]
        return " ".join(paragraph.split())


def new_plugin_manager() -> pluggy.PluginManager:
    """A plugin manager that knows the mtlhooks hook specifications."""
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(hookspecs)
    return manager


def _check_plugin_class(name: str, obj: object, source: str) -> type[Plugin]:
    if not (isinstance(obj, type) and issubclass(obj, Plugin)):
        raise PluginError(f"plugin {name!r} from {source} is not a subclass of mtlhooks.Plugin")
    cls: type[Plugin] = obj
    if getattr(cls, "name", None) != name:
        raise PluginError(
            f"plugin class {cls.__qualname__} from {source} is registered as {name!r} "
            f"but its `name` attribute is {getattr(cls, 'name', None)!r}: make them equal"
        )
    if not isinstance(getattr(cls, "family", None), Family):
        raise PluginError(f"plugin {name!r}: `family` must be one of {[f.value for f in Family]}")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, PluginConfig)):
        raise PluginError(f"plugin {name!r}: `Config` must subclass mtlhooks.PluginConfig")
    if cls.needs is not Need.NOTHING and not cls.spaces:
        raise PluginError(f"plugin {name!r} reads task gradients but declares no `spaces`")
    method = getattr(cls, "method", None)
    if method is not None and not (
        isinstance(method, MethodSpec) and cls.family is Family.AGGREGATOR
    ):
        raise PluginError(
            f"plugin {name!r}: `method` must be a mtlhooks.method.MethodSpec, on an aggregator"
        )
    # Register the class itself with a scratch manager: pluggy checks hook names and arguments.
    manager = new_plugin_manager()
    try:
        manager.register(cls, name=name)
        manager.check_pending()
    except pluggy.PluginValidationError as error:
        raise PluginError(
            f"plugin {name!r} from {source} breaks the hook contract: {error}"
        ) from error
    for hook_name in dir(manager.hook):
        if not hook_name.startswith("mtl_"):
            continue
        for impl in getattr(manager.hook, hook_name).get_hookimpls():
            if (impl.tryfirst or impl.trylast) and not (impl.wrapper or impl.hookwrapper):
                raise PluginError(
                    f"plugin {name!r}: {hook_name} uses tryfirst/trylast; mtlhooks runs "
                    "plugins in config order, so reorder the config instead"
                )
    return cls


def _load(reference: str, name: str, source: str) -> type[Plugin]:
    module_name, _, attribute = reference.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise PluginError(f"cannot load plugin {name!r} from {source}: {error}") from error
    return _check_plugin_class(name, obj, source)


@functools.cache
def _entry_points() -> dict[str, list[metadata.EntryPoint]]:
    """Third-party entry points by name (several when packages clash on a name)."""
    found: dict[str, list[metadata.EntryPoint]] = {}
    seen: set[tuple[str, str, str]] = set()
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist.name if entry_point.dist is not None else ""
        if dist == DISTRIBUTION:
            continue  # mtlhooks' own: the built-ins
        key = (entry_point.name, entry_point.value, dist)
        if key in seen:  # the same distribution found twice on sys.path
            continue
        seen.add(key)
        found.setdefault(entry_point.name, []).append(entry_point)
    return found


def _source(entry_point: metadata.EntryPoint) -> str:
    dist = entry_point.dist.name if entry_point.dist is not None else "unknown distribution"
    return f"entry point {entry_point.value} ({dist})"


_REGISTERED: dict[str, type[Plugin]] = {}


def register(cls: type[Plugin]) -> type[Plugin]:
    """Make a plugin class findable by its ``name`` in this process (notebooks, tests, scripts
    that define a method inline); usable as a class decorator. Packages should use the entry
    point instead. A name that a built-in, an installed entry point or an earlier
    ``register()`` already has is refused."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"{cls!r} has no `name` to register under")
    if name in BUILTINS or name in _REGISTERED or name in _entry_points():
        raise PluginError(f"a plugin named {name!r} already exists; choose another name")
    _REGISTERED[name] = _check_plugin_class(name, cls, "register()")
    get_plugin.cache_clear()
    return cls


def unregister(name: str) -> None:
    """Forget a plugin added with :func:`register`."""
    _REGISTERED.pop(name, None)
    get_plugin.cache_clear()


def _missing_builtins_error(name: str) -> PluginError:
    return PluginError(
        f"cannot find plugin {name!r}: mtlhooks' built-in plugins are entry points of its "
        "installed distribution, and none were found (mtlhooks imported from a source tree "
        "that is not installed, or installed before the entry points existed). Install it: "
        "`pip install -e .` in the repository (or `pip install mtlhooks`)."
    )


@functools.cache
def get_plugin(name: str) -> PluginInfo:
    """Find a plugin by name; :class:`ConfigError` lists the known names when none matches.

    :raises PluginError: when two providers claim ``name`` (a third-party package and a built-in,
        or two packages): choosing one would be a guess.
    """
    candidates = _entry_points().get(name, [])
    providers = [*(["mtlhooks (built-in)"] if name in BUILTINS else []), *map(_source, candidates)]
    if len(providers) > 1:
        raise PluginError(
            f"plugin name {name!r} is claimed by {len(providers)} providers: "
            f"{'; '.join(providers)}. Uninstall one of the packages, or ask its author to rename "
            "the plugin."
        )
    if name in BUILTINS:
        return PluginInfo(name, _load(BUILTINS[name], name, "builtin"), "builtin")
    if name in _REGISTERED:
        return PluginInfo(name, _REGISTERED[name], "register()")
    if not candidates:
        if not BUILTINS:
            raise _missing_builtins_error(name)
        names = plugin_names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"unknown plugin {name!r}; {hint}known plugins: {', '.join(sorted(names))} (a plugin "
            "just added to a pyproject.toml is found once its package is installed again)"
        )
    (entry_point,) = candidates
    source = _source(entry_point)
    try:
        loaded = entry_point.load()
    except ImportError as error:
        raise PluginError(f"cannot load plugin {name!r} from {source}: {error}") from error
    return PluginInfo(name, _check_plugin_class(name, loaded, source), source)


def plugin_names() -> list[str]:
    """Every name a config may use: built-ins, registered classes, installed entry points."""
    extra = sorted((set(_REGISTERED) | set(_entry_points())) - set(BUILTINS))
    return list(BUILTINS) + extra


def builtin_plugins() -> list[PluginInfo]:
    """The built-in plugins, loaded and checked, in their declaration order."""
    return [get_plugin(name) for name in BUILTINS]


def available_plugins() -> list[PluginInfo]:
    """Every plugin, loaded and checked."""
    return [get_plugin(name) for name in plugin_names()]


def refresh() -> None:
    """Forget cached look-ups, e.g. after installing a package with new entry points."""
    _entry_points.cache_clear()
    get_plugin.cache_clear()
