"""The benchmark's full-size Kandinsky writer, at a shrunken width: the folder it writes is the
combined layout that both libraries load, and they make the same image from it. (A broken writer
would otherwise show only on a GPU machine, after minutes of writing full-size weights.)"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the benchmark compares against the reference library")


def shrunk(spec: dict) -> dict:
    """The published Kandinsky 2.2 configs with every width cut down, the structure kept."""
    spec = copy.deepcopy(spec)
    kandinsky = spec["kandinsky22"]
    kandinsky["unet"].update(
        block_out_channels=[32, 64, 64, 64],
        layers_per_block=1,
        attention_head_dim=8,
        encoder_hid_dim=32,
        cross_attention_dim=32,
        addition_embed_type_num_heads=4,
        sample_size=32,
    )
    kandinsky["movq"].update(block_out_channels=[32, 32, 32, 32], norm_num_groups=8, layers_per_block=1)
    kandinsky["prior"].update(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=32)
    small_clip = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "projection_dim": 32}
    kandinsky["prior_text_encoder"].update(small_clip, vocab_size=1000)
    kandinsky["prior_image_encoder"].update(small_clip)
    return spec


def test_write_kandinsky_gives_a_combined_folder_both_libraries_load_alike(tmp_path, monkeypatch):
    from gesso import AutoPipelineForText2Image

    from benchmarks import checkpoints

    spec = shrunk(checkpoints.architectures())
    monkeypatch.setattr(checkpoints, "architectures", lambda: spec)
    folder = checkpoints.write_kandinsky(tmp_path / "kandinsky22", device="cpu", dtype=torch.float32)

    reference = diffusers.AutoPipelineForText2Image.from_pretrained(folder)
    ours = AutoPipelineForText2Image.from_pretrained(folder)
    assert type(reference).__name__ == type(ours).__name__ == "KandinskyV22CombinedPipeline"
    call = {"height": 64, "width": 64, "num_inference_steps": 2, "prior_num_inference_steps": 2, "output_type": "np"}
    expected = reference("a cat", generator=torch.Generator().manual_seed(0), **call).images
    image = ours("a cat", generator=torch.Generator().manual_seed(0), **call).images
    np.testing.assert_allclose(image, expected, atol=1e-4)
    assert expected.std() > 0  # a real image, not a constant one that any writer would match
