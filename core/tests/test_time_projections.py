"""``fuse_time_projections``: every resnet's time projection as one matrix product a step.

What could go wrong: a resnet reading another's columns, the activation applied twice or not at
all, a block handing the embedding to something else than its resnets, weights that no longer
match the checkpoint, and resnets of one shape no longer sharing one compiled block.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from gesso import AutoPipelineForText2Image
from gesso.nn import UNet2DConditionModel
from gesso.nn.resnet import ResnetBlock2D
from gesso.nn.unet_blocks import DownBlock2D
from gesso.optimize.precompiled import artifact_key
from gesso.runner import optimize
from torch.utils import _pytree as pytree

CONFIG = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=4,
    norm_num_groups=8,
)


def unet(**overrides) -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = UNet2DConditionModel(**{**CONFIG, **overrides}).eval()
    with torch.no_grad():  # biases are zero at init: give each projection its own
        for module in model.modules():
            if isinstance(module, ResnetBlock2D) and module.time_emb_proj is not None:
                module.time_emb_proj.bias.normal_()
    return model


def call(model: UNet2DConditionModel, timestep: int = 10) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 5, 16, generator=generator)
    with torch.no_grad():
        return model(sample, timestep, context, return_dict=False)[0]


def resnets(model: torch.nn.Module) -> list[ResnetBlock2D]:
    return [m for m in model.modules() if isinstance(m, ResnetBlock2D)]


def count_projection_calls(model: torch.nn.Module) -> list[int]:
    calls = [0]
    for resnet in resnets(model):
        resnet.time_emb_proj.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(
    "overrides",
    [{}, {"resnet_time_scale_shift": "scale_shift"}, {"resnet_skip_time_act": True}, {"act_fn": "mish"}],
    ids=["default", "scale-shift", "skip-time-act", "mish"],
)
def test_fused_projections_give_the_output_of_separate_ones(overrides):
    plain, fused = unet(**overrides), unet(**overrides)
    calls = count_projection_calls(fused)
    assert fused.fuse_time_projections()
    torch.testing.assert_close(call(fused), call(plain), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(call(fused, timestep=700), call(plain, timestep=700), rtol=1e-5, atol=1e-6)
    assert calls == [0]  # no resnet projected on its own
    assert fused.time_projections.weight.shape[0] == sum(r.time_emb_proj.out_features for r in resnets(fused))


def test_the_state_dict_keeps_the_published_weights_which_share_the_joint_tensor():
    plain, fused = unet(), unet()
    fused.fuse_time_projections()
    state, published = fused.state_dict(), plain.state_dict()
    assert state.keys() == published.keys()
    for name, tensor in published.items():
        assert torch.equal(state[name], tensor), name
    with torch.no_grad():  # an edit of a published weight in place (as a LoRA merge does) reaches the joint product
        resnets(fused)[3].time_emb_proj.weight.mul_(2)
        resnets(plain)[3].time_emb_proj.weight.mul_(2)
    torch.testing.assert_close(call(fused), call(plain), rtol=1e-5, atol=1e-6)


def test_a_block_that_does_not_declare_it_keeps_separate_projections(monkeypatch):
    monkeypatch.setattr(DownBlock2D, "time_embedding_feeds_resnets_only", False)
    model = unet()
    weights = [r.time_emb_proj.weight for r in resnets(model)]
    assert not model.fuse_time_projections()
    assert model.time_projections is None
    assert [r.time_emb_proj.weight for r in resnets(model)] == weights and not any(r.time_projected for r in resnets(model))


def test_resnets_of_one_shape_still_share_one_compiled_block():
    model = unet()
    model.fuse_time_projections()
    joint = torch.randn(2, model.time_projections.weight.shape[0])
    first, second = model.down_blocks[0].resnets  # one shape, different columns
    keys = []
    for resnet in (first, second):
        seen = {}
        handle = resnet.register_forward_pre_hook(lambda module, args, seen=seen: seen.setdefault("args", args))  # after the columns' hook
        with torch.no_grad():
            resnet(torch.randn(2, 32, 8, 8), joint)
        handle.remove()
        assert seen["args"][1].shape == (2, resnet.time_emb_proj.out_features)
        leaves, spec = pytree.tree_flatten((seen["args"], {}))
        keys.append(artifact_key(resnet, leaves, spec, {}))
    assert keys[0] == keys[1]


def test_a_fused_resnet_still_pickles_for_the_compile_workers():
    model = unet()
    model.fuse_time_projections()
    resnet = resnets(model)[2]
    copy = pickle.loads(pickle.dumps(resnet))
    joint = torch.randn(2, model.time_projections.weight.shape[0])
    hidden = torch.randn(2, resnet.conv1.in_channels, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(copy(hidden, joint), resnet(hidden, joint))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from gesso_sd15.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-sd15"))


def test_the_optimization_gives_the_pipeline_image_and_applies_twice_harmlessly(folder):
    def image(pipeline):
        return pipeline("a cat", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images

    plain = AutoPipelineForText2Image.from_pretrained(folder)
    pipeline = AutoPipelineForText2Image.from_pretrained(folder)
    optimize(pipeline, ["fuse_time_projections"])
    joint = pipeline.unet.time_projections
    optimize(pipeline, ["fuse_time_projections"])
    assert pipeline.unet.time_projections is joint
    np.testing.assert_allclose(image(pipeline), image(plain), atol=1e-5, rtol=0)
