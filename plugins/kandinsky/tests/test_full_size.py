"""Parity at the published Kandinsky 2.2 sizes, with random weights shared between the two models.

The reference is built on the meta device and filled cheaply; gesso's model is built on meta too
and given the reference's tensors with ``assign=True`` and ``strict=True``, so every published
weight name and shape is checked and only one copy of the weights exists.
"""

from __future__ import annotations

import gc
import inspect
import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="parity tests compare against the reference library")
pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[3] / "tests" / "data" / "full-size-architectures.json"


def full_config(key: str) -> dict:
    node = json.loads(DATA.read_text())["kandinsky22"][key]
    return {k: v for k, v in node.items() if not k.startswith("_")}


def cheap_fill(model: torch.nn.Module, std: float = 0.02) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)


def shared_pair(reference_cls, ours_cls, config: dict):
    with torch.device("meta"):
        reference = reference_cls(**config)
    reference = reference.to_empty(device="cpu").eval()
    cheap_fill(reference)
    with torch.device("meta"):
        ours = ours_cls.from_config(config)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return reference, ours.eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    assert torch.isfinite(expected).all() and expected.abs().max() > 0
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


@torch.no_grad()
def test_decoder_unet_full_size():
    import gesso_kandinsky.unet  # noqa: F401 - registers the blocks
    from gesso.nn import UNet2DConditionModel

    config = full_config("unet")
    reference, ours = shared_pair(diffusers.UNet2DConditionModel, UNet2DConditionModel, config)
    assert sum(p.numel() for p in ours.parameters()) == json.loads(DATA.read_text())["kandinsky22"]["unet"]["_params"]
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    added = {"image_embeds": torch.randn(1, 1280, generator=g)}
    want = reference(sample, torch.tensor([981]), encoder_hidden_states=None, added_cond_kwargs=added).sample
    got = ours(sample, torch.tensor([981]), encoder_hidden_states=None, added_cond_kwargs=added).sample
    assert got.shape == (1, 8, 8, 8)  # noise and the learned-variance half
    assert_close(got, want)
    del reference, ours
    gc.collect()


@torch.no_grad()
def test_movq_full_size():
    from gesso_kandinsky.movq import VQModel

    config = full_config("movq")
    reference, ours = shared_pair(diffusers.VQModel, VQModel, config)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    assert_close(ours.decode(latents, force_not_quantize=True).sample, reference.decode(latents, force_not_quantize=True).sample)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    assert_close(ours.encode(image).latents, reference.encode(image).latents)
    del reference, ours
    gc.collect()


@torch.no_grad()
def test_prior_full_size():
    from gesso_kandinsky.prior_transformer import PriorTransformer

    config = full_config("prior")
    # the published prior is the reference class's defaults but for the CLIP embedding size (ViT-bigG: 1280)
    defaults = {n: p.default for n, p in inspect.signature(diffusers.PriorTransformer.__init__).parameters.items() if n != "self"}
    assert {k: v for k, v in config.items() if defaults[k] != v} == {"embedding_dim": 1280}
    reference, ours = shared_pair(diffusers.PriorTransformer, PriorTransformer, config)
    length = config["num_embeddings"] + config["additional_embeddings"]  # to_empty left the reference's mask buffer unset
    reference.causal_attention_mask = torch.full((length, length), -10000.0).triu_(1)[None]
    g = torch.Generator().manual_seed(3)
    latents, text = torch.randn(1, 1280, generator=g), torch.randn(1, 1280, generator=g)
    tokens = torch.randn(1, 77, 1280, generator=g)
    mask = torch.zeros(1, 77, dtype=torch.bool)
    mask[0, :9] = True  # a 9-token prompt: the padding is hidden
    want = reference(latents, torch.tensor(500), text, tokens, attention_mask=mask).predicted_image_embedding
    got = ours(latents, torch.tensor(500), text, tokens, attention_mask=mask).predicted_image_embedding
    assert_close(got, want)
    assert_close(ours.post_process_latents(got), reference.post_process_latents(want))
    del reference, ours
    gc.collect()
