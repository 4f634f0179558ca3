"""UNet2DConditionModel: parity with the reference on tiny SD1.5- and SDXL-shaped configs."""

from __future__ import annotations

import pytest
import torch
from gesso.nn import (
    ADDITION_EMBEDDINGS,
    DOWN_BLOCKS,
    ENCODER_HID_PROJECTIONS,
    DownBlock2D,
    UNet2DConditionModel,
    register_addition_embedding,
    register_block,
    register_encoder_hid_projection,
)
from gesso.streams import InFlight
from nn_parity import assert_close, perturb_vectors
from torch import nn

diffusers = pytest.importorskip("diffusers")

SD15_TINY = dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=24,
    attention_head_dim=4,  # number of heads, by the reference's historical quirk
    norm_num_groups=16,
)

SDXL_TINY = dict(
    sample_size=16,
    block_out_channels=(32, 64, 96),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    layers_per_block=2,
    cross_attention_dim=40,
    attention_head_dim=[2, 4, 6],
    transformer_layers_per_block=[1, 2, 3],
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
    norm_num_groups=16,
)


def build_pair(config: dict, seed: int = 0) -> tuple[nn.Module, UNet2DConditionModel]:
    torch.manual_seed(seed)
    reference = diffusers.UNet2DConditionModel(**config).eval()
    perturb_vectors(reference, seed)
    ours = UNet2DConditionModel.from_config(dict(reference.config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def inputs(batch: int = 2, size: tuple[int, int] = (16, 16), cross_dim: int = 24, seq: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, *size, generator=g),
        timestep=torch.tensor([999, 17])[:batch],
        encoder_hidden_states=torch.randn(batch, seq, cross_dim, generator=g),
    )


def sdxl_added(batch: int = 2, seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [512.0, 768.0, 16.0, 8.0, 640.0, 640.0]])[:batch]
    return dict(text_embeds=torch.randn(batch, 16, generator=g), time_ids=time_ids)


@torch.no_grad()
def test_sd15_tiny_parity_and_keys():
    reference, ours = build_pair(SD15_TINY)
    shapes = lambda model: {k: tuple(v.shape) for k, v in model.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(reference)
    x = inputs()
    assert_close(ours(**x).sample, reference(**x).sample)
    assert ours.config.attention_head_dim == 4
    assert ours.config.block_out_channels == (32, 64, 64)


@torch.no_grad()
def test_timestep_forms_broadcast_like_reference():
    reference, ours = build_pair(SD15_TINY)
    x = inputs()
    for timestep in (10, 10.5, torch.tensor(10), torch.tensor([10]), torch.tensor([10.0, 500.0])):
        x["timestep"] = timestep
        assert_close(ours(**x).sample, reference(**x).sample)


@torch.no_grad()
def test_sdxl_tiny_text_time_parity():
    reference, ours = build_pair(SDXL_TINY)
    x = inputs(cross_dim=40)
    added = sdxl_added()
    expected = reference(**x, added_cond_kwargs=added).sample
    assert_close(ours(**x, added_cond_kwargs=added).sample, expected)
    # The added embedding is really used: other time_ids change the prediction.
    other = dict(added, time_ids=added["time_ids"] + 64)
    assert not torch.allclose(ours(**x, added_cond_kwargs=other).sample, expected, atol=1e-4)
    with pytest.raises(ValueError, match="time_ids"):
        ours(**x, added_cond_kwargs={"text_embeds": added["text_embeds"]})


def controlnet_residuals(seed: int = 5) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Residuals for SD15_TINY's skips and mid block, as a ControlNet hands them over."""
    g = torch.Generator().manual_seed(seed)
    # conv_in + 1 resnet at 16x16, downsample, 1 resnet at 8x8, downsample, 1 resnet at 4x4
    shapes = [(32, 16, 16)] * 2 + [(32, 8, 8), (64, 8, 8), (64, 4, 4), (64, 4, 4)]
    return tuple(torch.randn(2, *shape, generator=g) for shape in shapes), torch.randn(2, 64, 4, 4, generator=g)


@torch.no_grad()
def test_controlnet_residual_injection():
    reference, ours = build_pair(SD15_TINY)
    x = inputs()
    skips, mid = controlnet_residuals()
    kwargs = dict(down_block_additional_residuals=skips, mid_block_additional_residual=mid)
    expected = reference(**x, **kwargs).sample
    assert_close(ours(**x, **kwargs).sample, expected)
    assert not torch.allclose(ours(**x).sample, expected, atol=1e-4)
    with pytest.raises(ValueError, match="down_block_additional_residuals"):
        ours(**x, down_block_additional_residuals=skips[:-1], mid_block_additional_residual=mid)


class _Recorded(InFlight):
    """An ``InFlight`` whose wait, instead of joining a CUDA stream, notes when the UNet made it."""

    def wait(self):
        self.stream.append("residuals read")
        return self.value


@torch.no_grad()
def test_residuals_in_flight_are_waited_for_only_after_the_mid_block():
    # What lets a ControlNet on a second stream overlap the UNet's down blocks and mid block: the UNet
    # joins that stream only once it needs the residuals, and adds them as it would given tensors.
    _, ours = build_pair(SD15_TINY)
    x = inputs()
    skips, mid = controlnet_residuals()
    events: list[str] = []
    ours.mid_block.register_forward_pre_hook(lambda module, args: events.append("mid block"))
    for block in ours.up_blocks:
        block.register_forward_pre_hook(lambda module, args: events.append("up block"))
    in_flight = ours(**x, down_block_additional_residuals=_Recorded(skips, events), mid_block_additional_residual=_Recorded(mid, events))
    assert events[:4] == ["mid block", "residuals read", "residuals read", "up block"]
    expected = ours(**x, down_block_additional_residuals=skips, mid_block_additional_residual=mid)
    assert torch.equal(in_flight.sample, expected.sample)


@pytest.mark.parametrize("size", [(9, 11), (12, 6)])
@torch.no_grad()
def test_odd_latent_sizes(size):
    reference, ours = build_pair(SD15_TINY)
    x = inputs(size=size)
    out = ours(**x, return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (2, 4, *size)
    assert_close(out[0], reference(**x).sample)


@torch.no_grad()
def test_encoder_attention_mask_matches_reference():
    reference, ours = build_pair(SD15_TINY)
    x = inputs()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    assert_close(ours(**x, encoder_attention_mask=mask).sample, reference(**x, encoder_attention_mask=mask).sample)


@torch.no_grad()
def test_variants_center_input_mid_none_scale_shift():
    config = dict(
        SD15_TINY,
        center_input_sample=True,
        resnet_time_scale_shift="scale_shift",
        only_cross_attention=True,
        mid_block_type="UNetMidBlock2D",
        freq_shift=1,
        flip_sin_to_cos=False,
        upcast_attention=True,
    )
    reference, ours = build_pair(config)
    x = inputs()
    assert_close(ours(**x).sample, reference(**x).sample)
    reference, ours = build_pair(dict(SD15_TINY, mid_block_type=None, time_cond_proj_dim=8, encoder_hid_dim=12))
    x = inputs(cross_dim=12)
    cond = torch.randn(2, 8)
    assert_close(ours(**x, timestep_cond=cond).sample, reference(**x, timestep_cond=cond).sample)
    assert ours.config.encoder_hid_dim_type == "text_proj"


@torch.no_grad()
def test_meta_construction_then_assign():
    """The loading path: build on meta, assign the weights; nothing may be left on meta."""
    reference, _ = build_pair(SDXL_TINY)
    with torch.device("meta"):
        ours = UNet2DConditionModel.from_config(dict(reference.config))
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    x, added = inputs(cross_dim=40), sdxl_added()
    assert_close(ours(**x, added_cond_kwargs=added).sample, reference(**x, added_cond_kwargs=added).sample)


def test_unknown_types_name_the_config_key():
    with pytest.raises(ValueError, match="down_block_types.*'NoSuchBlock'"):
        UNet2DConditionModel(**dict(SD15_TINY, down_block_types=("NoSuchBlock", "CrossAttnDownBlock2D", "DownBlock2D")))
    with pytest.raises(ValueError, match="mid_block_type.*'NoSuchMid'"):
        UNet2DConditionModel(**dict(SD15_TINY, mid_block_type="NoSuchMid"))
    with pytest.raises(ValueError, match="addition_embed_type.*'nope'"):
        UNet2DConditionModel(**dict(SD15_TINY, addition_embed_type="nope"))
    with pytest.raises(ValueError, match="encoder_hid_dim_type.*'nope'"):
        UNet2DConditionModel(**dict(SD15_TINY, encoder_hid_dim_type="nope", encoder_hid_dim=8))
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNet2DConditionModel(**dict(SD15_TINY, attention_head_dim=[4, 4]))


@torch.no_grad()
def test_registered_block_is_used():
    """A plugin-registered name builds through the same factory protocol."""
    calls = []

    def factory(spec):
        calls.append((spec.kind, spec.index, spec.in_channels, spec.out_channels, spec.add_resample))
        return DownBlock2D(spec)

    register_block("down", "PluginDownBlock2D", factory)
    try:
        reference, _ = build_pair(SD15_TINY)
        ours = UNet2DConditionModel(
            **dict(SD15_TINY, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "PluginDownBlock2D"))
        )
        ours.load_state_dict(reference.state_dict(), strict=True)
        assert calls == [("down", 2, 64, 64, False)]
        x = inputs()
        assert_close(ours(**x).sample, reference(**x).sample)
    finally:
        del DOWN_BLOCKS["PluginDownBlock2D"]


class _AddedFromKwargs(nn.Module):
    def forward(self, emb, encoder_hidden_states, added_cond_kwargs):
        return added_cond_kwargs["extra"]


class _StatesFromImage(nn.Module):
    def forward(self, encoder_hidden_states, added_cond_kwargs):
        return added_cond_kwargs["image_embeds"]


@torch.no_grad()
def test_registered_addition_embedding_and_hid_projection_feed_forward():
    register_addition_embedding("test_extra", lambda config, dim: _AddedFromKwargs())
    register_encoder_hid_projection("test_image", lambda config, dim: _StatesFromImage())
    try:
        _, plain = build_pair(SD15_TINY)
        hooked = UNet2DConditionModel(
            **dict(SD15_TINY, addition_embed_type="test_extra", encoder_hid_dim_type="test_image", encoder_hid_dim=3)
        )
        hooked.load_state_dict(plain.state_dict(), strict=True)
        x = inputs()
        image_states = torch.randn(2, 5, 24)
        zero = torch.zeros(2, 128)
        text_ignored = dict(x, encoder_hidden_states=torch.zeros(2, 7, 24))
        out = hooked(**text_ignored, added_cond_kwargs={"extra": zero, "image_embeds": image_states}).sample
        assert_close(out, plain(**dict(x, encoder_hidden_states=image_states)).sample)
        shifted = hooked(**text_ignored, added_cond_kwargs={"extra": zero + 1, "image_embeds": image_states}).sample
        assert not torch.allclose(shifted, out, atol=1e-4)
    finally:
        del ADDITION_EMBEDDINGS["test_extra"], ENCODER_HID_PROJECTIONS["test_image"]


def test_unsupported_options_are_refused():
    with pytest.raises(NotImplementedError, match="class_embed_type"):
        UNet2DConditionModel(**dict(SD15_TINY, class_embed_type="timestep"))


@torch.no_grad()
def test_loads_a_folder_saved_by_the_reference(tmp_path):
    """The published on-disk layout (config.json + safetensors written by the reference) loads unchanged."""
    reference, _ = build_pair(SDXL_TINY)
    reference.save_pretrained(tmp_path / "unet")
    ours = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    x, added = inputs(cross_dim=40), sdxl_added()
    assert_close(ours(**x, added_cond_kwargs=added).sample, reference(**x, added_cond_kwargs=added).sample)
    ours.save_pretrained(tmp_path / "again")
    again = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "again")
    assert_close(again(**x, added_cond_kwargs=added).sample, reference(**x, added_cond_kwargs=added).sample)
