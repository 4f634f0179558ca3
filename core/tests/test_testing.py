"""The test kit (gesso.testing): its fixtures do what they say, and its helpers fail when they should."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gesso import hookimpl, hookspecs
from gesso.contract import ModelFamily
from gesso.hookspecs import GessoDeprecationWarning
from gesso.pipeline import PipelineOutput
from gesso.pipeline_loading import DiffusionPipeline
from gesso.plugins import PluginHost, get_host
from gesso.testing import (
    TINY_CALL,
    assert_images_close,
    assert_images_differ,
    assert_pipelines_agree,
    assert_plugin_loads,
    assert_same_image,
    assert_same_image_for_seed,
    render,
)
from PIL import Image

Failed = pytest.fail.Exception


# -- a family for the kit's own tests: "images" straight from the generator -----------------------
class KitPipeline(DiffusionPipeline):
    family = "kit"
    calls: list[dict] = []

    def __call__(self, prompt=None, negative_prompt=None, num_inference_steps=None, guidance_scale=None, height=None,
                 width=None, num_images_per_prompt=1, generator=None, output_type="pil"):  # fmt: skip
        KitPipeline.calls.append({"prompt": prompt, "num_inference_steps": num_inference_steps})
        noise = torch.rand((num_images_per_prompt, 3, 8, 8), generator=generator) * 2 - 1
        from gesso.images import postprocess

        return PipelineOutput(images=postprocess(noise, output_type))


WRITES: list[Path] = []


def write_kit_checkpoint(folder: Path, flavour: str = "plain") -> Path:
    WRITES.append(Path(folder))
    (Path(folder) / "model_index.json").write_text(json.dumps({"_class_name": "KitPipeline", "flavour": flavour}))
    return Path(folder)


class KitFamily:
    @hookimpl
    def register_families(self, register):
        register(ModelFamily(name="kit", pipeline=KitPipeline, pipeline_class_names=("KitPipeline",), tiny_checkpoint=write_kit_checkpoint))


class FakePipeline:
    """A callable with a pipeline's call convention; ``noise`` says where its randomness comes from."""

    def __init__(self, noise: str = "generator", scale: float = 1.0) -> None:
        self.noise, self.scale, self.calls = noise, scale, []

    def __call__(self, generator=None, output_type="pil", **call):
        self.calls.append({**call, "output_type": output_type})
        if self.noise == "constant":
            images = torch.full((1, 4, 4, 3), 0.5)
        else:
            images = torch.rand((1, 4, 4, 3), generator=generator if self.noise == "generator" else None)
        return SimpleNamespace(images=(images * self.scale).numpy())


# -- the pytest plugin ------------------------------------------------------------------------------
def test_pytest_plugin_is_registered_through_pytest11(pytestconfig):
    (entry_point,) = [e for e in metadata.entry_points(group="pytest11") if e.name == "gesso"]
    assert entry_point.value == "gesso.testing"
    assert pytestconfig.pluginmanager.hasplugin("gesso")


# -- plugin_host ------------------------------------------------------------------------------------
HOSTS: list[PluginHost] = []


def test_plugin_host_registers_the_given_plugins_and_becomes_the_process_host(plugin_host):
    host = plugin_host(KitFamily())
    HOSTS.append(host)
    assert get_host() is host
    assert "kit" in host.registry.families and "EulerDiscreteScheduler" in host.registry.schedulers
    assert "sd15" not in host.registry.families  # no entry points unless asked for


def test_plugin_host_is_not_kept_after_its_test():
    assert HOSTS, "runs after the test above"
    assert get_host() is not HOSTS[0]


def test_plugin_host_fails_the_test_when_a_given_plugin_does_not_register(plugin_host):
    class Broken:
        @hookimpl
        def register_schedulers(self, register):
            raise RuntimeError("boom while registering")

    with pytest.raises(Failed, match="boom while registering"):
        plugin_host(Broken())
    host = plugin_host(Broken(), allow_failures=True)
    assert host.failures[-1].stage == "register"


def test_plugin_host_loads_only_the_named_entry_points(plugin_host, fake_distribution):
    site = fake_distribution("gesso-kit", {"kit_a": "gesso_kit_plugin_a", "kit_b": "gesso_kit_no_such_module"})
    (site / "gesso_kit_plugin_a.py").write_text(
        "from gesso import hookimpl\nfrom gesso.contract import Scheduler\n"
        "@hookimpl\ndef register_schedulers(register):\n"
        "    register(Scheduler(target='gesso.schedulers:DDIMScheduler', class_name='KitScheduler', short_names={'kit': {}}))\n"
    )
    host = plugin_host(entry_points=["kit_a"])
    assert [p.name for p in host.plugins if not p.builtin] == ["kit_a"]
    assert not host.failures  # kit_b was never tried
    assert "kit" in host.registry.scheduler_short_names
    by_module_name = plugin_host("gesso_kit_plugin_a")  # a plugin may also be given by module name
    assert by_module_name.registry.owner("scheduler", "kit") == "gesso_kit_plugin_a"


# -- tiny_checkpoint -------------------------------------------------------------------------------
def test_tiny_checkpoint_writes_each_family_and_options_once(plugin_host, tiny_checkpoint):
    plugin_host(KitFamily())
    before = len(WRITES)
    folder = tiny_checkpoint("kit")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "KitPipeline"
    assert tiny_checkpoint("kit") == folder
    other = tiny_checkpoint("kit", flavour="spicy")
    assert other != folder and json.loads((other / "model_index.json").read_text())["flavour"] == "spicy"
    assert len(WRITES) - before <= 2  # a test before this one may already have written the plain one


def test_tiny_checkpoint_is_shared_by_the_tests_of_a_session(plugin_host, tiny_checkpoint):
    plugin_host(KitFamily())
    before = len(WRITES)
    folder = tiny_checkpoint("kit")
    assert len(WRITES) == before and folder in WRITES  # written by the test above, not again


def test_tiny_checkpoint_writable_copy_leaves_the_shared_one_alone(plugin_host, tiny_checkpoint):
    plugin_host(KitFamily())
    shared = tiny_checkpoint("kit")
    copy = tiny_checkpoint("kit", writable=True)
    assert copy != shared and (copy / "model_index.json").read_text() == (shared / "model_index.json").read_text()
    (copy / "model_index.json").write_text("{}")
    assert json.loads((shared / "model_index.json").read_text())["_class_name"] == "KitPipeline"


def test_tiny_checkpoint_of_an_unknown_family_fails_the_test(plugin_host, tiny_checkpoint):
    plugin_host()
    with pytest.raises(Failed, match="family 'nope' is not installed"):
        tiny_checkpoint("nope")


# -- image comparisons -----------------------------------------------------------------------------
def test_assert_same_image_names_how_many_pixels_differ():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    b = a.copy()
    assert_same_image(Image.fromarray(a), Image.fromarray(b))
    b[1, 2] = [0, 9, 0]
    with pytest.raises(AssertionError, match="1 pixels differ"):
        assert_same_image(Image.fromarray(a), Image.fromarray(b))
    with pytest.raises(AssertionError, match="shapes differ"):
        assert_same_image(a, a[:2])


def test_assert_images_close_compares_8_bit_and_float_images_on_one_scale():
    pixels = np.full((2, 2, 3), 255, dtype=np.uint8)
    assert_images_close(pixels, np.ones((2, 2, 3), dtype=np.float32))
    assert_images_close(pixels, torch.ones(2, 2, 3))
    with pytest.raises(AssertionError, match="differ by up to 7.84e-03"):
        assert_images_close(pixels, pixels - 2)
    assert_images_close(pixels, pixels - 2, atol=0.01)


def test_assert_images_differ():
    a = np.zeros((2, 2, 3))
    with pytest.raises(AssertionError, match="images are the same"):
        assert_images_differ(a, a.copy())
    assert assert_images_differ(a, a + 0.25) == pytest.approx(0.25)
    with pytest.raises(AssertionError):
        assert_images_differ(a, a + 0.25, atol=0.5)


# -- same seed, same image -------------------------------------------------------------------------
def test_render_fills_in_the_tiny_call_and_keeps_what_is_given():
    pipeline = FakePipeline()
    images = render(pipeline, seed=1)
    assert images.shape == (1, 4, 4, 3)
    assert pipeline.calls[-1] == {**TINY_CALL, "output_type": "np"}
    render(pipeline, seed=1, prompt="mine", num_inference_steps=5)
    assert pipeline.calls[-1]["prompt"] == "mine" and pipeline.calls[-1]["num_inference_steps"] == 5
    render(pipeline, prompt_embeds=torch.zeros(1))
    assert "prompt" not in pipeline.calls[-1]


def test_same_image_for_seed_passes_for_a_seeded_pipeline():
    images = assert_same_image_for_seed(FakePipeline(), seed=3)
    np.testing.assert_array_equal(images, torch.rand((1, 4, 4, 3), generator=torch.Generator().manual_seed(3)).numpy())


def test_same_image_for_seed_catches_noise_drawn_from_the_global_rng():
    with pytest.raises(Failed, match="seed 0 gave two different images"):
        assert_same_image_for_seed(FakePipeline(noise="global"))


def test_same_image_for_seed_catches_a_pipeline_that_ignores_the_seed():
    with pytest.raises(Failed, match="seeds 4 and 5 gave the same image"):
        assert_same_image_for_seed(FakePipeline(noise="constant"), seed=4)
    assert_same_image_for_seed(FakePipeline(noise="constant"), seed=4, other_seed=None)


def test_same_image_for_seed_runs_run_configs_and_yaml_files(plugin_host, tiny_checkpoint, tmp_path):
    plugin_host(KitFamily())
    config = {"model": str(tiny_checkpoint("kit"))}
    KitPipeline.calls.clear()
    images = assert_same_image_for_seed(config, seed=9)
    assert images.dtype == np.uint8 and images.shape == (1, 8, 8, 3)
    assert KitPipeline.calls[0] == TINY_CALL  # the run config got the tiny call's prompt and steps
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {config['model']}\nprompt: from a file\n")
    assert_same_image(render(path, seed=9), images)  # the kit's images do not depend on the prompt
    assert KitPipeline.calls[-1]["prompt"] == "from a file"


def test_pipelines_agree_or_the_difference_is_reported():
    first, second = assert_pipelines_agree(FakePipeline(), FakePipeline(), seed=2)
    assert_same_image(first, second)
    with pytest.raises(AssertionError, match="pixels differ"):
        assert_pipelines_agree(FakePipeline(), FakePipeline(scale=0.999), seed=2)
    assert_pipelines_agree(FakePipeline(), FakePipeline(scale=0.999), seed=2, atol=1e-3)
    with pytest.raises(AssertionError, match="differ by up to"):
        assert_pipelines_agree(FakePipeline(), FakePipeline(scale=0.5), seed=2, atol=1e-3)


# -- assert_plugin_loads ---------------------------------------------------------------------------
GOOD_PLUGIN = (
    "from gesso import hookimpl\nfrom gesso.contract import Scheduler\n"
    "@hookimpl\ndef register_schedulers(register):\n"
    "    register(Scheduler(target='gesso.schedulers:DDIMScheduler', class_name='{name}'))\n"
)


def test_assert_plugin_loads_returns_what_an_installed_plugin_registers(fake_distribution):
    site = fake_distribution("gesso-kit-good", {"kit_good": "gesso_kit_good"}, requires=["gesso>=0.1"])
    (site / "gesso_kit_good.py").write_text(GOOD_PLUGIN.format(name="KitGoodScheduler"))
    info = assert_plugin_loads("kit_good")
    assert (info.distribution, info.registers) == ("gesso-kit-good", {"schedulers": ["KitGoodScheduler"]})


@pytest.mark.parametrize(
    ("entry_point", "requires", "message"),
    [
        ("gesso_kit_no_such_module", [], "failed at import: ModuleNotFoundError"),
        ("gesso_kit_good_too", ["gesso>=99"], "failed at incompatible: requires gesso>=99"),
    ],
)
def test_assert_plugin_loads_fails_for_a_broken_or_incompatible_plugin(fake_distribution, entry_point, requires, message):
    site = fake_distribution("gesso-kit-bad", {"kit_bad": entry_point}, requires=requires)
    (site / "gesso_kit_good_too.py").write_text(GOOD_PLUGIN.format(name="KitGoodTooScheduler"))
    with pytest.raises(Failed, match=message):
        assert_plugin_loads("kit_bad")


def test_assert_plugin_loads_fails_for_a_name_that_is_not_installed():
    with pytest.raises(Failed, match="no 'gesso' entry point named 'kit_absent' is installed"):
        assert_plugin_loads("kit_absent")


@hookspecs.hookspec(
    warn_on_impl=GessoDeprecationWarning("register_legacy is deprecated and goes away in gesso 0.3; use register_schedulers")
)
def register_legacy(register):
    """A deprecated hook, for the tests below."""


def test_deprecated_hook_warns_when_a_plugin_registers_and_assert_plugin_loads_fails(monkeypatch, fake_distribution):
    monkeypatch.setattr(hookspecs, "register_legacy", register_legacy, raising=False)
    site = fake_distribution("gesso-kit-old", {"kit_old": "gesso_kit_old"})
    (site / "gesso_kit_old.py").write_text(
        GOOD_PLUGIN.format(name="KitOldScheduler") + "@hookimpl\ndef register_legacy(register):\n    pass\n"
    )
    import gesso_kit_old

    with pytest.warns(GessoDeprecationWarning, match="register_legacy is deprecated"):
        assert PluginHost(entry_points=False).register(gesso_kit_old) is not None  # still works meanwhile
    with pytest.raises(Failed, match="uses deprecated parts of the gesso contract: register_legacy is deprecated .*gesso_kit_old.py"):
        assert_plugin_loads("kit_old")
    assert assert_plugin_loads("kit_old", deprecations="ignore").registers == {"schedulers": ["KitOldScheduler"]}
