"""Optimizations on the CPU path: same images, composable from the run config, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gesso import AutoPipelineForText2Image
from gesso.config import ConfigError
from gesso.plugins import get_host
from gesso.runner import optimize


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from gesso_sd15.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-sd15"))


def images(pipeline, seed=0):
    return pipeline("a cat", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(seed)).images


def optimized(folder, *names):
    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    optimize(pipeline, names)
    return pipeline


def test_fused_projections_and_channels_last_give_the_same_image(folder):
    plain = images(AutoPipelineForText2Image.from_pretrained(folder))
    pipeline = optimized(folder, "fuse_qkv", "channels_last")
    fused = [m for m in pipeline.unet.modules() if getattr(m, "fused", None)]
    assert {m.fused for m in fused} == {"qkv", "kv"}
    assert pipeline.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(images(pipeline), plain, atol=1e-4)  # float32 rounding of larger GEMMs / NHWC convs
    assert set(pipeline.unet.state_dict()) == set(AutoPipelineForText2Image.from_pretrained(folder).unet.state_dict())


CHILD_LOADS_COMPILED_BLOCKS = """
import sys, numpy, torch
from gesso import AutoPipelineForText2Image
from gesso.optimize.precompiled import PrecompiledForward
from gesso.runner import optimize

def refuse(*args, **kwargs):
    raise AssertionError("a block was compiled again instead of loaded")

PrecompiledForward._compile = refuse
pipeline = AutoPipelineForText2Image.from_pretrained(sys.argv[1])
optimize(pipeline, ["compile"])
image = pipeline("a cat", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
numpy.save(sys.argv[2], image)
"""


def test_regional_compile_gives_the_same_image_and_a_new_process_loads_the_compiled_blocks(folder, tmp_path, monkeypatch):
    import subprocess
    import sys

    from gesso.optimize.precompiled import PrecompiledForward

    monkeypatch.setenv("GESSO_COMPILE_BACKEND", "aot_eager")  # full graph capture, no code generation (CI time)
    monkeypatch.setenv("GESSO_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(PrecompiledForward, "_artifacts", {})
    plain = images(AutoPipelineForText2Image.from_pretrained(folder))
    pipeline = optimized(folder, "compile")
    compiled = [m for m in pipeline.unet.modules() if isinstance(m.__dict__.get("forward"), PrecompiledForward)]
    assert compiled and {type(m).__name__ for m in compiled} <= {
        "Transformer2DModel",
        "ResnetBlock2D",
        "Downsample2D",
        "Upsample2D",
        "OutputGroupNorm",
    }
    assert isinstance(pipeline.unet.conv_norm_out.__dict__.get("forward"), PrecompiledForward)  # outside every block
    image = images(pipeline)
    np.testing.assert_allclose(image, plain, atol=1e-4)
    artifacts = sorted((tmp_path / "cache").iterdir())
    assert 0 < len(artifacts) < len(compiled)  # blocks of one class and shape share one compilation

    done = subprocess.run(
        [sys.executable, "-c", CHILD_LOADS_COMPILED_BLOCKS, str(folder), str(tmp_path / "child.npy")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "child.npy"), image)
    assert sorted((tmp_path / "cache").iterdir()) == artifacts


def test_compile_cache_off_compiles_in_each_process(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("GESSO_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setenv("GESSO_COMPILE_CACHE", "off")
    monkeypatch.chdir(tmp_path)  # nothing may be written here either
    plain = images(AutoPipelineForText2Image.from_pretrained(folder))
    pipeline = optimized(folder, "compile")
    compiled = [m for m in pipeline.unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled
    np.testing.assert_allclose(images(pipeline), plain, atol=1e-4)
    assert list(tmp_path.iterdir()) == []


def test_offload_runs_components_in_the_family_order(folder):
    from gesso.optimize.offload import model_cpu_offload

    plain = images(AutoPipelineForText2Image.from_pretrained(folder))
    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    chain = model_cpu_offload(pipeline, get_host().registry.families["sd15"].execution_policy, "cpu")
    names = {id(getattr(pipeline, n)): n for n in ("text_encoder", "unet", "vae")}
    order = []
    activate = chain.activate
    chain.activate = lambda module: (order.append(names.get(id(module))), activate(module))[1]
    np.testing.assert_array_equal(images(pipeline), plain)
    assert [n for i, n in enumerate(order) if i == 0 or order[i - 1] != n] == ["text_encoder", "unet", "vae"]


def test_run_config_selects_optimizations_and_refuses_unsupported_ones(folder, tmp_path, monkeypatch):
    import gesso

    base = {"model": str(folder), "prompt": "a cat", "num_inference_steps": 2, "seed": 1, "output": {"dir": str(tmp_path)}}
    plain = gesso.run(base, write=False).images[0]
    fused = gesso.run({**base, "optimizations": ["fuse_qkv", "channels_last"]}, write=False).images[0]
    assert np.abs(np.asarray(plain, dtype=int) - np.asarray(fused, dtype=int)).max() <= 1
    with pytest.raises(ConfigError, match="'cuda_graph' runs on cuda, not 'cpu'"):
        gesso.run({**base, "optimizations": ["cuda_graph"]}, write=False)
    with pytest.raises(ConfigError, match="did you mean 'fuse_qkv'"):
        gesso.run({**base, "optimizations": ["fuse_qvk"]}, write=False)
    assert get_host().registry.optimizations["cuda_graph"].supports("sd15", "cuda") is None
    # A preset means "what of it applies here": on the CPU, fast runs without its CUDA-only members.
    monkeypatch.setenv("GESSO_COMPILE_BACKEND", "aot_eager")  # graph capture without code generation (CI time)
    fast = gesso.run({**base, "optimizations": ["fast"]}, write=False).images[0]
    assert np.abs(np.asarray(plain, dtype=int) - np.asarray(fast, dtype=int)).max() <= 1


def test_graph_output_copies_survive_the_next_replay():
    """The graph's output buffers are reused by every replay; callers must get copies."""
    from gesso.nn.unet_2d_condition import UNet2DConditionOutput
    from gesso.optimize.cuda_graph import _detached_copy

    static = UNet2DConditionOutput(sample=torch.ones(2))
    copied = _detached_copy((static, [static.sample], {"x": static.sample}))
    static.sample.fill_(5)
    assert copied[0].sample.tolist() == [1.0, 1.0]
    assert copied[1][0].tolist() == [1.0, 1.0] and copied[2]["x"].tolist() == [1.0, 1.0]


def test_cuda_graph_wraps_the_hot_loop_and_the_per_image_modules_in_one_pool(folder):
    from gesso.optimize.cuda_graph import GraphedForward, cuda_graph

    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    cuda_graph(pipeline, get_host().registry.families["sd15"].execution_policy)

    graphed = {name: module.forward for name, module in pipeline.modules()} | {"vae.decoder": pipeline.vae.decoder.forward}
    assert all(isinstance(graphed[name], GraphedForward) for name in ("unet", "text_encoder", "vae.decoder"))
    assert not isinstance(pipeline.vae.forward, GraphedForward)  # encode + decode: only its decoder runs per image
    assert len({id(graphed[name].pool) for name in ("unet", "text_encoder", "vae.decoder")}) == 1
    assert len(graphed["unet"].weights) == len(pipeline.unet.state_dict())  # every weight the graph reads is watched


def test_per_image_paths_reach_submodules_and_skip_missing_components(folder):
    from gesso.contract import ExecutionPolicy
    from gesso.optimize import per_image_modules

    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    policy = ExecutionPolicy(per_image=("text_encoder", "vae.decoder", "text_encoder_2", "vae.missing"))
    assert per_image_modules(pipeline, policy) == {"text_encoder": pipeline.text_encoder, "vae.decoder": pipeline.vae.decoder}


def test_graphed_weights_that_move_are_noticed():
    """Offload lends weights to the GPU anew for every image and ``to(dtype)`` replaces them; a graph
    captured on the old addresses would read freed memory, so each call compares addresses."""
    from gesso.optimize.cuda_graph import GraphedForward

    module = torch.nn.Linear(4, 4)
    graphed = GraphedForward(module.forward, module)
    captured = graphed.placement
    assert graphed._placement() == captured
    module.to(torch.float64)
    assert graphed._placement() != captured


def test_cuda_graph_keeps_a_vae_that_decodes_in_float32_there(tiny_checkpoint):
    """SDXL decodes in float32 (``force_upcast``) by casting the VAE per image; under graphs the cast
    is made once, so the decoder's weights stay where its graph reads them."""
    from gesso.optimize.cuda_graph import cuda_graph

    pipeline = AutoPipelineForText2Image.from_pretrained(tiny_checkpoint("sdxl"), torch_dtype=torch.float16)
    assert pipeline.vae.config.force_upcast and pipeline.vae.dtype == torch.float16
    cuda_graph(pipeline, get_host().registry.families["sdxl"].execution_policy)
    assert pipeline.vae.dtype == torch.float32 and pipeline.unet.dtype == torch.float16
    assert pipeline.text_encoder_2.forward.pool is pipeline.vae.decoder.forward.pool


def test_a_plugins_optimization_gets_the_options_of_the_run_config(folder, tmp_path, plugin_host):
    """``optimization_options.<name>`` reaches ``apply`` as keyword options; misspelt ones are refused
    by name before the model loads."""
    import gesso
    from gesso.contract import OptimizationSpec
    from gesso.hookspecs import hookimpl

    received = []

    class Plugin:
        @hookimpl
        def register_optimizations(self, register):
            def apply(pipeline, policy, strength=1):
                received.append(strength)

            register(OptimizationSpec(name="sharpen", apply=apply, devices=("cpu",), options={"strength": 1}))

    plugin_host("gesso_sd15.plugin", Plugin())
    base = {"model": str(folder), "prompt": "a cat", "num_inference_steps": 1, "output": {"dir": str(tmp_path)}}
    gesso.run({**base, "optimizations": ["sharpen"], "optimization_options": {"sharpen": {"strength": 3}}}, write=False)
    gesso.run({**base, "optimizations": ["sharpen"]}, write=False)
    assert received == [3, 1]
    with pytest.raises(ConfigError, match=r"optimization_options\.sharpen\.strenght: unknown option \(did you mean 'strength'\?\)"):
        gesso.run({**base, "optimizations": ["sharpen"], "optimization_options": {"sharpen": {"strenght": 3}}}, write=False)
    with pytest.raises(ConfigError, match=r"optimization_options\.sharpen: optimization 'sharpen' is not chosen"):
        gesso.run({**base, "optimization_options": {"sharpen": {"strength": 3}}}, write=False)
    with pytest.raises(ConfigError, match=r"optimization_options\.fuse_qkv\.x: unknown option; 'fuse_qkv' takes no options"):
        gesso.run({**base, "optimizations": ["fast"], "optimization_options": {"fuse_qkv": {"x": 1}}}, write=False)
    assert len(received) == 2  # refused before anything ran


def test_a_plugins_optimization_joins_the_fast_preset_it_names(folder, plugin_host, monkeypatch):
    """``OptimizationSpec.presets``: a plugin's optimization runs with ``fast`` where the plugin is
    installed, in its order among the core's members; one for another family is skipped."""
    from gesso.config import presets
    from gesso.contract import OptimizationSpec
    from gesso.hookspecs import hookimpl
    from gesso.optimize import compile as compile_module

    ran = []

    def fused_attentions(pipeline):
        return sum(1 for m in pipeline.unet.modules() if getattr(m, "fused", None))

    class Plugin:
        @hookimpl
        def register_optimizations(self, register):
            def after_fusion(pipeline, policy):
                ran.append(("after_fusion", fused_attentions(pipeline)))

            def elsewhere(pipeline, policy):
                ran.append(("elsewhere", 0))

            register(OptimizationSpec(name="after_fusion", apply=after_fusion, devices=("cpu",), order=12, presets=("fast",)))
            register(OptimizationSpec(name="elsewhere", apply=elsewhere, devices=("cpu",), families=("sdxl",), presets=("fast",)))

    host = plugin_host("gesso_sd15.plugin", Plugin())
    fast = presets(host.registry)["fast"]
    assert fast[-2:] == ["after_fusion", "elsewhere"] and {"fuse_qkv", "compile"} <= set(fast)
    monkeypatch.setattr(compile_module, "compile_blocks", lambda module, mode="default": None)  # CI time
    optimize(AutoPipelineForText2Image.from_pretrained(folder), ["fast"], host=host)
    assert [name for name, _ in ran] == ["after_fusion"] and ran[0][1] > 0  # order 12: after fuse_qkv's 10


def test_a_familys_policy_adds_preset_members_for_that_family_only(folder, plugin_host, monkeypatch):
    """``ExecutionPolicy.preset_members``: an optimization that pays for one family's models joins
    ``fast`` for that family; the others' ``fast`` stays without it."""
    import dataclasses

    from gesso.config import presets
    from gesso.contract import OptimizationSpec
    from gesso.hookspecs import hookimpl
    from gesso.optimize import compile as compile_module

    ran = []

    class Plugin:
        @hookimpl
        def register_optimizations(self, register):
            register(OptimizationSpec(name="for_some", apply=lambda pipeline, policy: ran.append(policy), devices=("cpu",)))

    host = plugin_host("gesso_sd15.plugin", Plugin())
    policy = host.registry.families["sd15"].execution_policy
    adding = dataclasses.replace(policy, preset_members={"fast": ("for_some", "not_registered")})
    assert "for_some" not in presets(host.registry)["fast"] and "for_some" not in presets(host.registry, policy)["fast"]
    assert presets(host.registry, adding)["fast"][-1] == "for_some"  # a name nobody registered is left out
    monkeypatch.setattr(compile_module, "compile_blocks", lambda module, mode="default": None)  # CI time
    optimize(AutoPipelineForText2Image.from_pretrained(folder), ["fast"], host=host)
    assert ran == []
    optimize(AutoPipelineForText2Image.from_pretrained(folder), ["fast"], host=host, policy=adding)
    assert ran == [adding]


def test_compile_modes_reach_torch_compile_and_graph_capturing_modes_are_refused(folder, monkeypatch):
    from gesso.optimize import compile as compile_module

    assert "mode" not in compile_module.options()  # Inductor's default
    assert compile_module.options("max-autotune-no-cudagraphs")["mode"] == "max-autotune-no-cudagraphs"
    monkeypatch.setenv("GESSO_COMPILE_MODE", "max-autotune-no-cudagraphs")
    assert compile_module.options()["mode"] == "max-autotune-no-cudagraphs"  # the variable fills in the default only
    monkeypatch.delenv("GESSO_COMPILE_MODE")

    compiled_modes = []
    monkeypatch.setattr(compile_module, "compile_blocks", lambda module, mode="default": compiled_modes.append(mode))
    monkeypatch.setenv("GESSO_COMPILE_CACHE", "off")
    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    optimize(pipeline, ["fast"], options={"compile": {"mode": "max-autotune-no-cudagraphs"}})
    assert compiled_modes == ["max-autotune-no-cudagraphs"]
    with pytest.raises(ConfigError, match=r"optimization_options\.compile_full: mode 'reduce-overhead' is not supported \(it captures"):
        optimize(pipeline, ["compile_full"], options={"compile_full": {"mode": "reduce-overhead"}})


def test_per_image_graphs_of_weights_that_move_after_a_call_or_two_give_way_to_eager_calls(folder):
    """A capture costs about WARMUP_CALLS eager calls: a module lent to the GPU for one or two calls an
    image (a text encoder or decoder under offload) must stop capturing. A denoiser must not, even
    after a short run: the next call may run 50 steps."""
    from gesso.optimize.cuda_graph import WARMUP_CALLS, GraphedForward, cuda_graph

    for calls, per_image, eager in ((WARMUP_CALLS, True, True), (WARMUP_CALLS + 1, True, False), (1, False, False)):
        module = torch.nn.Linear(4, 4)
        graphed = GraphedForward(module.forward, module, give_way_to_eager=per_image)
        graphed.graphs[("signature",)] = None
        graphed.calls_since_capture = calls
        graphed._weights_moved()
        assert graphed.eager is eager and graphed.graphs == {}
        assert torch.equal(graphed(torch.ones(4)), module(torch.ones(4)))

    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    cuda_graph(pipeline, get_host().registry.families["sd15"].execution_policy)
    assert not pipeline.unet.forward.give_way_to_eager
    assert pipeline.text_encoder.forward.give_way_to_eager and pipeline.vae.decoder.forward.give_way_to_eager


def test_cudnn_benchmark_is_on_inside_the_hot_loops_calls_only(folder):
    from gesso.optimize import cudnn_benchmark, wrapper_chain

    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    own_forward = pipeline.unet.forward
    cudnn_benchmark(pipeline, get_host().registry.families["sd15"].execution_policy)
    assert own_forward in list(wrapper_chain(pipeline.unet.forward))  # later wrappers can find what lies beneath
    seen: dict[str, list[bool]] = {"unet": [], "vae": []}
    pipeline.unet.conv_in.register_forward_pre_hook(lambda *_: seen["unet"].append(torch.backends.cudnn.benchmark))
    pipeline.vae.decoder.conv_in.register_forward_pre_hook(lambda *_: seen["vae"].append(torch.backends.cudnn.benchmark))
    assert torch.backends.cudnn.benchmark is False

    images(pipeline)
    assert seen["unet"] and all(seen["unet"])  # each step's convolutions may be timed...
    assert seen["vae"] and not any(seen["vae"])  # ...the decoder's, outside the hot loop, keep the process's setting
    assert torch.backends.cudnn.benchmark is False

    def fail(*_):
        raise RuntimeError("a step that fails")

    pipeline.unet.conv_in.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="a step that fails"):
        images(pipeline)
    assert torch.backends.cudnn.benchmark is False  # restored on the way out of a failed call too


@pytest.mark.parametrize("name", ["sdpa_flash", "sdpa_cudnn", "sdpa_efficient"])
def test_an_attention_kernel_pin_runs_on_the_cpu_exactly_where_it_says_it_does(folder, name):
    """PyTorch's CPU has a flash kernel, and no cuDNN or memory-efficient one: a pin that claims the CPU
    generates there, the others are refused by name before any work."""
    from gesso.runner import optimize

    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    if get_host().registry.optimizations[name].supports("sd15", "cpu") is None:
        optimize(pipeline, [name])
        np.testing.assert_allclose(images(pipeline), images(AutoPipelineForText2Image.from_pretrained(folder)), atol=1e-5)
    else:
        with pytest.raises(ConfigError, match=name):
            optimize(pipeline, [name])
