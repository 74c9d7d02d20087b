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
