"""Finding plugins by name: the built-ins, then the entry-point group ``mtlhooks.plugins``.

A third-party package adds a method without touching mtlhooks::

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
import warnings
from dataclasses import dataclass
from importlib import metadata

import pluggy

from mtlhooks import hookspecs
from mtlhooks.errors import ConfigError, PluginError
from mtlhooks.plugin import PROJECT, Family, Need, Plugin, PluginConfig, Space

ENTRY_POINT_GROUP = "mtlhooks.plugins"

BUILTINS: dict[str, str] = {
    "static": "mtlhooks.plugins.static:Static",
    "avgnorm": "mtlhooks.plugins.avgnorm:AvgNorm",
    "pcgrad": "mtlhooks.plugins.pcgrad:PCGrad",
    "mgda": "mtlhooks.plugins.mgda:MGDA",
    "gradstats": "mtlhooks.plugins.gradstats:GradStats",
    "uncertainty": "mtlhooks.plugins.uncertainty:Uncertainty",
    "uw_so": "mtlhooks.plugins.uw_so:UWSO",
    "dwa": "mtlhooks.plugins.dwa:DWA",
    "rlw": "mtlhooks.plugins.rlw:RLW",
    "gls": "mtlhooks.plugins.gls:GLS",
    "imtl_l": "mtlhooks.plugins.imtl_l:IMTLL",
    "slaw": "mtlhooks.plugins.slaw:SLAW",
    "famo": "mtlhooks.plugins.famo:FAMO",
    "gradnorm": "mtlhooks.plugins.gradnorm:GradNorm",
    "db_mtl": "mtlhooks.plugins.db_mtl:DBMTL",
    "upgrad": "mtlhooks.plugins.upgrad:UPGrad",
    "dualproj": "mtlhooks.plugins.dualproj:DualProj",
    "cagrad": "mtlhooks.plugins.cagrad:CAGrad",
    "imgrad": "mtlhooks.plugins.imgrad:IMGrad",
    "imtl_g": "mtlhooks.plugins.imtl_g:IMTLG",
    "aligned_mtl": "mtlhooks.plugins.aligned_mtl:AlignedMTL",
    "nash_mtl": "mtlhooks.plugins.nash_mtl:NashMTL",
    "fairgrad": "mtlhooks.plugins.fairgrad:FairGrad",
    "config": "mtlhooks.plugins.config:ConFIG",
    "gradvac": "mtlhooks.plugins.gradvac:GradVac",
    "graddrop": "mtlhooks.plugins.graddrop:GradDrop",
}
"""Built-in plugins: name → ``module:Class`` (imported on first use)."""


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
def _entry_points() -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in BUILTINS or entry_point.name in _REGISTERED:
            warnings.warn(
                f"entry point {entry_point.value!r} registers plugin {entry_point.name!r}, "
                "which is a built-in name; the built-in is used",
                stacklevel=2,
            )
            continue
        found.setdefault(entry_point.name, entry_point)
    return found


_REGISTERED: dict[str, type[Plugin]] = {}


def register(cls: type[Plugin]) -> type[Plugin]:
    """Make a plugin class findable by its ``name`` in this process (notebooks, tests, scripts
    that define a method inline); usable as a class decorator. Packages should use the entry
    point instead. A built-in or already registered name is refused."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"{cls!r} has no `name` to register under")
    if name in BUILTINS or name in _REGISTERED:
        raise PluginError(f"a plugin named {name!r} already exists; choose another name")
    _REGISTERED[name] = _check_plugin_class(name, cls, "register()")
    get_plugin.cache_clear()
    return cls


def unregister(name: str) -> None:
    """Forget a plugin added with :func:`register`."""
    _REGISTERED.pop(name, None)
    get_plugin.cache_clear()


@functools.cache
def get_plugin(name: str) -> PluginInfo:
    """Find a plugin by name; :class:`ConfigError` lists the known names when none matches."""
    if name in BUILTINS:
        return PluginInfo(name, _load(BUILTINS[name], name, "builtin"), "builtin")
    if name in _REGISTERED:
        return PluginInfo(name, _REGISTERED[name], "register()")
    entry_point = _entry_points().get(name)
    if entry_point is None:
        names = plugin_names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"unknown plugin {name!r}; {hint}known plugins: {', '.join(sorted(names))}"
        )
    dist = entry_point.dist.name if entry_point.dist is not None else "unknown distribution"
    source = f"entry point {entry_point.value} ({dist})"
    try:
        cls = _check_plugin_class(name, entry_point.load(), source)
    except ImportError as error:
        raise PluginError(f"cannot load plugin {name!r} from {source}: {error}") from error
    return PluginInfo(name, cls, source)


def plugin_names() -> list[str]:
    """Every name a config may use: built-ins, registered classes, installed entry points."""
    extra = sorted(set(_REGISTERED) | set(_entry_points()))
    return list(BUILTINS) + extra


def available_plugins() -> list[PluginInfo]:
    """Every plugin, loaded and checked."""
    return [get_plugin(name) for name in plugin_names()]


def refresh() -> None:
    """Forget cached look-ups, e.g. after installing a package with new entry points."""
    _entry_points.cache_clear()
    get_plugin.cache_clear()
