"""transformers objects passed in as components: they run in the pipeline, and it saves and reloads.

gesso loads the CLIP components with its own classes; a user may still hand it transformers' (a
fine-tuned text encoder, say). The saved folder names them as transformers classes, which gesso
loads with its own classes again, and the same seed gives the same image throughout.
"""

from __future__ import annotations

import json

import gesso
import pytest
import torch
from gesso import clip
from gesso.testing import assert_images_close

transformers = pytest.importorskip("transformers")


@pytest.fixture
def host(plugin_host):
    return plugin_host(entry_points=["sd15"])


def render(pipeline):
    return pipeline(["a cat", "a dog"], num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_transformers_components_run_save_and_reload(host, tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("sd15", safety_checker=True)
    theirs = {
        "text_encoder": transformers.CLIPTextModel.from_pretrained(folder / "text_encoder"),
        "tokenizer": transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        "feature_extractor": transformers.CLIPImageProcessor.from_pretrained(folder / "feature_extractor"),
    }
    mixed = gesso.AutoPipelineForText2Image.from_pretrained(folder, **theirs)
    assert all(getattr(mixed, name) is value for name, value in theirs.items())
    expected = render(gesso.AutoPipelineForText2Image.from_pretrained(folder))
    assert_images_close(render(mixed), expected, atol=1e-4)

    mixed.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    for name, value in theirs.items():
        assert index[name] == ["transformers", type(value).__name__], name
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    reloaded = gesso.AutoPipelineForText2Image.from_pretrained(tmp_path / "saved")
    assert type(reloaded.text_encoder) is clip.CLIPTextModel and type(reloaded.tokenizer) is clip.CLIPTokenizer
    assert type(reloaded.feature_extractor) is clip.CLIPImageProcessor
    assert_images_close(render(reloaded), expected, atol=1e-4)
