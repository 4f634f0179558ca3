"""PluginHost: discovery, isolation of broken plugins, allow/deny lists, duplicates, detection."""

from __future__ import annotations

import pytest
from gesso import hookimpl
from gesso.contract import Component, ConditionerSpec, ModelFamily, OptimizationSpec, Scheduler
from gesso.plugins import PluginHost, PluginLoadError
from gesso.registry import FamilyNotFoundError


def family_plugin(name: str, claims: tuple[str, ...] = ("FakePipeline",), score: int | None = None) -> object:
    class Plugin:
        @hookimpl
        def register_families(self, register):
            register(
                ModelFamily(
                    name=name,
                    pipeline="builtins:object",
                    pipeline_class_names=claims,
                    recognise=(lambda index: score) if score is not None else None,
                )
            )

    Plugin.__name__ = f"{name}_plugin"
    return Plugin()


def test_builtins_register_schedulers_components_and_optimizations():
    host = PluginHost(entry_points=False)
    assert not host.failures
    assert ("diffusers", "UNet2DConditionModel") in host.registry.components
    assert "EulerDiscreteScheduler" in host.registry.schedulers
    assert host.registry.scheduler_short_names["dpmpp_2m_karras"][0] == "DPMSolverMultistepScheduler"
    assert "compile" in host.registry.optimizations


def test_broken_entry_point_is_recorded_and_others_still_load(fake_distribution):
    fake_distribution("gesso-broken", {"broken": "gesso_no_such_module_xyz"})
    host = PluginHost(strict=False)
    failure = next(f for f in host.failures if f.name == "broken")
    assert failure.stage == "import"
    assert "gesso_no_such_module_xyz" in failure.error
    assert failure.distribution == "gesso-broken"
    assert "EulerDiscreteScheduler" in host.registry.schedulers


def test_strict_mode_reraises(fake_distribution, monkeypatch):
    fake_distribution("gesso-broken", {"broken": "gesso_no_such_module_xyz"})
    monkeypatch.setenv("GESSO_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="broken"):
        PluginHost()


def test_allow_and_deny_lists(fake_distribution, monkeypatch):
    fake_distribution("gesso-broken", {"broken": "gesso_no_such_module_xyz", "other": "gesso_other_missing"})
    monkeypatch.setenv("GESSO_DISABLE_PLUGINS", "broken")
    names = {f.name for f in PluginHost(strict=False).failures}
    assert "broken" not in names and "other" in names
    monkeypatch.delenv("GESSO_DISABLE_PLUGINS")
    monkeypatch.setenv("GESSO_LOAD_PLUGINS", "broken")
    names = {f.name for f in PluginHost(strict=False).failures}
    assert names == {"broken"}


def test_incompatible_plugin_is_reported_and_skipped(fake_distribution):
    fake_distribution("gesso-future", {"future": "gesso.builtin"}, requires=["gesso>=99"])
    host = PluginHost(strict=False)
    failure = next(f for f in host.failures if f.name == "future")
    assert failure.stage == "incompatible"
    assert "gesso>=99" in failure.error
    assert "future" not in {p.name for p in host.plugins}


def test_duplicate_family_names_both_plugins():
    host = PluginHost(entry_points=False, strict=False)
    host.register(family_plugin("dup"), name="first")
    assert host.register(family_plugin("dup"), name="second") is None
    failure = host.failures[-1]
    assert "'first'" in failure.error and "'second'" in failure.error
    assert host.registry.owner("family", "dup") == "first"


def test_duplicate_scheduler_short_name_is_an_error():
    class Plugin:
        @hookimpl
        def register_schedulers(self, register):
            register(Scheduler(target="builtins:object", class_name="MyScheduler", short_names={"euler": {}}))

    host = PluginHost(entry_points=False, strict=False)
    assert host.register(Plugin(), name="mine") is None
    assert "euler" in host.failures[-1].error and "gesso.builtin" in host.failures[-1].error


def test_misspelt_hook_name_fails_loudly():
    class Plugin:
        @hookimpl
        def register_familys(self, register):  # typo
            pass

    host = PluginHost(entry_points=False, strict=False)
    assert host.register(Plugin(), name="typo") is None
    assert "register_familys" in host.failures[-1].error


def test_plugin_raising_while_registering_leaves_nothing_behind():
    class Plugin:
        @hookimpl
        def register_families(self, register):
            register(ModelFamily(name="half", pipeline="builtins:object", pipeline_class_names=("X",)))
            raise RuntimeError("boom")

    host = PluginHost(entry_points=False, strict=False)
    assert host.register(Plugin(), name="half") is None
    assert "half" not in host.registry.families
    assert "boom" in host.failures[-1].error


def test_detection_no_match_tie_and_explicit_family():
    host = PluginHost(entry_points=False)
    host.register(family_plugin("a", ("APipeline",)), name="a")
    host.register(family_plugin("b", ("APipeline",)), name="b")
    with pytest.raises(FamilyNotFoundError, match="both claim"):
        host.registry.detect_family({"_class_name": "APipeline"})
    assert host.registry.detect_family({"_class_name": "APipeline"}, family="b").name == "b"
    with pytest.raises(FamilyNotFoundError, match="install gesso-sdxl"):
        host.registry.detect_family({"_class_name": "StableDiffusionXLPipeline"})
    with pytest.raises(FamilyNotFoundError, match="did you mean 'a'"):
        host.registry.detect_family({"_class_name": "APipeline"}, family="aa")


def test_higher_recognition_score_wins():
    host = PluginHost(entry_points=False)
    host.register(family_plugin("generic", ("P",)), name="generic")
    host.register(family_plugin("special", ("P",), score=5), name="special")
    assert host.registry.detect_family({"_class_name": "P"}).name == "special"


def test_every_kind_of_registration_is_reported():
    class Plugin:
        @hookimpl
        def register_components(self, register):
            register(Component("mylib", "MyModel", "builtins:object"))

        @hookimpl
        def register_conditioners(self, register):
            register(ConditionerSpec(name="mine", pipeline_argument="mine", families=("sd15",), factory="builtins:object"))

        @hookimpl
        def register_optimizations(self, register):
            register(OptimizationSpec(name="nothing", apply="builtins:object", devices=("cpu",)))

    host = PluginHost(entry_points=False)
    info = host.register(Plugin(), name="everything")
    assert info.registers == {"components": ["mylib/MyModel"], "conditioners": ["mine"], "optimizations": ["nothing"]}
    report = host.report()
    assert any(p["name"] == "everything" for p in report["plugins"])


def test_listing_plugins_imports_neither_torch_nor_transformers():
    """Heavy imports happen when a family is used, not when ``gesso plugins`` lists it."""
    import subprocess
    import sys

    code = "import sys; from gesso.plugins import PluginHost; PluginHost(); print('torch' in sys.modules, 'transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False", "False"], result.stderr
