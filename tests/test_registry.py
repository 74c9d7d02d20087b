"""Finding plugins by name: built-ins, register(), and entry points of installed packages."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mtlhooks import MTL, Family, Plugin, Step, hookimpl, registry
from mtlhooks.errors import ConfigError, PluginError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "third_party_plugin"


@pytest.fixture
def clean_registry():
    registry.refresh()
    yield
    registry.refresh()


def _fake_distribution(root: Path, name: str, module: str, source: str) -> None:
    """An installed distribution in ``root``: a module plus a dist-info with an entry point."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[mtlhooks.plugins]\n{name} = {module}:Plugin\n")


def test_entry_point_plugin_is_found_by_name_and_runs(
    tmp_path, monkeypatch, clean_registry, problem
):
    _fake_distribution(
        tmp_path,
        "halve",
        "halve_plugin",
        """
        from mtlhooks import Family, Plugin as Base, hookimpl

        class Plugin(Base):
            '''Halves every weight.'''
            name = "halve"
            family = Family.LOSS_SCALING

            @hookimpl
            def mtl_scale_losses(self, step):
                step.weights = step.weights / 2
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    assert "halve" in registry.plugin_names()
    info = registry.get_plugin("halve")
    assert info.family is Family.LOSS_SCALING
    assert "halve_plugin" in info.source
    mtl = MTL({"tasks": problem.tasks, "plugins": ["halve"]})
    _, losses = problem.losses()
    report = mtl.backward(losses)
    torch.testing.assert_close(report.weights, torch.full((3,), 0.5, dtype=torch.float64))


def test_entry_point_with_a_bad_hook_fails_at_load(tmp_path, monkeypatch, clean_registry):
    _fake_distribution(
        tmp_path,
        "typo",
        "typo_plugin",
        """
        from mtlhooks import Family, Plugin as Base, hookimpl

        class Plugin(Base):
            name = "typo"
            family = Family.LOSS_SCALING

            @hookimpl
            def mtl_scale_loss(self, step):
                pass
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    with pytest.raises(PluginError, match=r"plugin 'typo' from entry point .*breaks the hook"):
        MTL({"tasks": ["a"], "plugins": ["typo"]})


def test_entry_point_that_cannot_import_is_named(tmp_path, monkeypatch, clean_registry):
    _fake_distribution(tmp_path, "broken", "broken_plugin", "import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    with pytest.raises(PluginError, match=r"cannot load plugin 'broken' from entry point"):
        registry.get_plugin("broken")


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"name": "other"}, "its `name` attribute is 'other'"),
        ({"family": "loss"}, "`family` must be one of"),
        ({"Config": dict}, "`Config` must subclass"),
        ({"needs": "gramian", "spaces": ()}, "declares no `spaces`"),
    ],
)
def test_bad_plugin_classes_are_refused(attributes, message):
    from mtlhooks.plugin import Need

    attributes = dict(attributes)
    if attributes.get("needs") == "gramian":
        attributes["needs"] = Need.GRAMIAN
    cls = type("Bad", (Plugin,), {"name": "bad", "family": Family.OBSERVER, **attributes})
    with pytest.raises(PluginError, match=message):
        registry._check_plugin_class("bad", cls, "test")


def test_hook_with_unknown_argument_is_refused(registered):
    class Wrong(Plugin):
        name = "test_wrong"
        family = Family.AGGREGATOR

        @hookimpl
        def mtl_aggregate(self, step: Step, gramian: torch.Tensor) -> torch.Tensor:
            return gramian

    with pytest.raises(PluginError, match="breaks the hook contract"):
        registered(Wrong)


def test_builtin_names_cannot_be_taken(registered):
    class Clash(Plugin):
        name = "pcgrad"
        family = Family.AGGREGATOR

    with pytest.raises(PluginError, match="already exists"):
        registered(Clash)


def test_unknown_plugin_lists_known_names():
    with pytest.raises(
        ConfigError,
        match=r"unknown plugin 'pcgard'; did you mean 'pcgrad'\? known plugins: .*\bavgnorm, ",
    ):
        registry.get_plugin("pcgard")


def test_example_package_installs_and_is_found(tmp_path, monkeypatch, clean_registry, problem):
    """The example third-party package, really installed by pip, is found by name."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
    )
    monkeypatch.syspath_prepend(str(target))
    registry.refresh()
    info = registry.get_plugin("inverse_loss")
    assert info.family is Family.LOSS_SCALING
    mtl = MTL({"tasks": problem.tasks, "plugins": [{"name": "inverse_loss", "eps": 1e-6}]})
    _, losses = problem.losses()
    values = torch.stack([losses[t].detach() for t in problem.tasks])
    report = mtl.backward(losses)
    torch.testing.assert_close(report.weights, 1 / (values + 1e-6))
    for name in list(sys.modules):
        if name.startswith("mtlhooks_inverse_loss"):
            del sys.modules[name]


# -- built-ins are entry points; one method, one file ------------------------------------------


def _declared_entry_points() -> dict[str, str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    return dict(project["project"]["entry-points"]["mtlhooks.plugins"])


def test_builtins_are_the_installed_entry_points_of_pyproject():
    """The installed metadata lists exactly pyproject's table (else: `pip install -e .` again),
    and every module of mtlhooks/plugins/ is declared there."""
    declared = _declared_entry_points()
    assert declared == registry.BUILTINS, "stale install: run `pip install -e .` again"
    modules = {
        path.stem
        for path in (Path(registry.__file__).parent / "plugins").glob("*.py")
        if path.stem != "__init__"
    }
    methods = {n: v for n, v in declared.items() if v.startswith("mtlhooks.plugins.")}
    # The rest are adapters to other libraries, shipped with mtlhooks (torchjd).
    adapters = set(declared) - set(methods)
    assert all(declared[n].startswith("mtlhooks.integrations.") for n in adapters)
    assert {value.split(":")[0].rsplit(".", 1)[1] for value in methods.values()} == modules
    for info in registry.builtin_plugins():
        assert info.source == "builtin"
        if info.name in methods:
            stem = info.cls.__module__.rsplit(".", 1)[1]
            assert info.cls.__module__ == f"mtlhooks.plugins.{stem}"


def test_every_builtin_aggregator_declares_its_method_in_its_own_file():
    from mtlhooks import functional

    for info in registry.builtin_plugins():
        if info.cls.__module__.startswith("mtlhooks.integrations."):
            continue  # an adapter runs another library's aggregators: no functional form here
        if info.family is not Family.AGGREGATOR:
            assert info.cls.method is None
            continue
        spec = info.cls.method
        assert spec is not None, f"{info.name} declares no method"
        assert spec.function.__module__ == info.cls.__module__
        assert functional.METHODS[info.name] is spec


def _module_imports(path: Path) -> set[str]:
    """mtlhooks modules a module imports at load time (TYPE_CHECKING blocks left out)."""
    import ast

    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("mtlhooks"))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mtlhooks"):
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    is_module = (ROOT_PACKAGE / Path(*candidate.split(".")[1:])).with_suffix(
                        ".py"
                    ).exists() or (ROOT_PACKAGE / Path(*candidate.split(".")[1:])).is_dir()
                    found.add(candidate if is_module else str(node.module))
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))

    visit(tree.body)
    return found


ROOT_PACKAGE = Path(registry.__file__).parent


def test_no_import_cycle_in_the_package():
    """A module imported first must never meet itself half-initialised: the graph of load-time
    imports between mtlhooks modules has no cycle (so every plugin module imports on its own)."""
    modules: dict[str, set[str]] = {}
    for path in ROOT_PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT_PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = _module_imports(path)
    visiting: list[str] = []
    done: set[str] = set()

    def walk(name: str) -> None:
        if name in done or name not in modules:
            return
        if name in visiting:
            cycle = [*visiting[visiting.index(name) :], name]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        visiting.append(name)
        for target in sorted(modules[name]):
            walk(target)
        visiting.pop()
        done.add(name)

    for name in sorted(modules):
        walk(name)


def test_a_plugin_module_imports_first_in_a_fresh_interpreter():
    code = "import mtlhooks.plugins.dualproj, mtlhooks.functional as F; print(len(F.METHODS))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from mtlhooks import functional

    assert int(result.stdout) == len(functional.METHODS)


def test_a_third_party_entry_point_with_a_builtin_name_is_refused(
    tmp_path, monkeypatch, clean_registry
):
    _fake_distribution(
        tmp_path,
        "mgda",
        "fake_mgda",
        """
        from mtlhooks import Family, Plugin as Base

        class Plugin(Base):
            name = "mgda"
            family = Family.AGGREGATOR
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    with pytest.raises(
        PluginError, match=r"'mgda' is claimed by 2 providers: mtlhooks .*fake_mgda"
    ):
        registry.get_plugin("mgda")
    assert registry.get_plugin("pcgrad").source == "builtin"  # other names are unaffected


def test_a_method_declaration_outside_an_aggregator_is_refused():
    from mtlhooks.functional import METHODS

    cls = type(
        "Bad", (Plugin,), {"name": "bad", "family": Family.LOSS_SCALING, "method": METHODS["mgda"]}
    )
    with pytest.raises(PluginError, match="`method` must be"):
        registry._check_plugin_class("bad", cls, "test")


def test_without_installed_metadata_the_error_says_to_install(monkeypatch, clean_registry):
    monkeypatch.setattr(registry, "BUILTINS", {})
    with pytest.raises(PluginError, match=r"pip install -e \."):
        registry.get_plugin("mgda")
