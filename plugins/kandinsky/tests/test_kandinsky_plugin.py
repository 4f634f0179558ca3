"""The family's registration, its own tiny checkpoints, model-card parsing and config-driven runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gesso import AutoPipelineForText2Image
from gesso.plugins import get_host
from gesso_kandinsky.pipeline import KandinskyV22CombinedPipeline, hub_options_of, prior_from_model_card
from gesso_kandinsky.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-kandinsky")
    return {layout: write_tiny_checkpoint(root / layout, layout=layout) for layout in ("combined", "decoder", "prior")}


def test_family_and_components_are_registered():
    registry = get_host().registry
    family = registry.families["kandinsky"]
    for class_name in ("KandinskyV22CombinedPipeline", "KandinskyV22Pipeline"):
        assert registry.detect_family({"_class_name": class_name}).name == "kandinsky"
    assert family.pipeline_class() is KandinskyV22CombinedPipeline
    assert {"prior_guidance_scale", "prior_num_inference_steps", "prior"} <= set(family.config_keys)
    for pair in (
        ("diffusers", "PriorTransformer"),
        ("diffusers", "VQModel"),
        ("diffusers", "UnCLIPScheduler"),
        ("transformers", "CLIPVisionModelWithProjection"),
    ):
        assert pair in registry.components


def test_own_tiny_checkpoint_is_the_reference_layout(tiny):
    """What gesso-kandinsky writes, the reference loads, and both make the same image."""
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.KandinskyV22CombinedPipeline.from_pretrained(tiny["combined"])
    reference.set_progress_bar_config(disable=True)
    ours = AutoPipelineForText2Image.from_pretrained(tiny["combined"])
    kwargs = {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "height": 32,
        "width": 40,
        "num_inference_steps": 2,
        "prior_num_inference_steps": 2,
        "output_type": "np",
    }
    want = reference(generator=torch.Generator().manual_seed(1), **kwargs).images
    got = ours(generator=torch.Generator().manual_seed(1), **kwargs).images
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


def test_model_card_front_matter(tmp_path):
    card = tmp_path / "README.md"
    assert prior_from_model_card(tmp_path) is None
    card.write_text("---\nlicense: apache-2.0\nprior:\n- org/the-prior\n- org/other\n---\n# x\n")
    assert prior_from_model_card(tmp_path) == "org/the-prior"
    card.write_text("---\nprior: org/single\n---\n")
    assert prior_from_model_card(tmp_path) == "org/single"
    card.write_text("# no front matter\nprior: org/ignored\n")
    assert prior_from_model_card(tmp_path) is None
    card.write_text("---\ntags: [a\n---\n")  # broken YAML: no prior, no exception
    assert prior_from_model_card(tmp_path) is None


def test_hub_cache_folder_names_its_cache(tmp_path):
    snapshot = tmp_path / "models--org--decoder" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    assert hub_options_of(snapshot) == {"cache_dir": str(tmp_path)}
    assert hub_options_of(tmp_path) == {}


def test_run_config_with_prior_key(tiny, tmp_path):
    """A decoder checkpoint plus ``prior=`` in the run config, through gesso.run (the CLI's path)."""
    import gesso
    from gesso.runner import resolve_config

    config = resolve_config({"model": str(tiny["decoder"])})
    assert config.family == "kandinsky"
    assert (config.num_inference_steps, config.guidance_scale, config.height, config.width) == (100, 4.0, 512, 512)
    assert (config.prior_num_inference_steps, config.prior_guidance_scale) == (25, 4.0)
    overrides = [
        f"prior={tiny['prior']}",
        "num_inference_steps=2",
        "prior_num_inference_steps=2",
        "height=32",
        "width=32",
        "seed=3",
        f"output.dir={tmp_path / 'out'}",
    ]
    result = gesso.run({"model": str(tiny["decoder"]), "prompt": "a lighthouse"}, overrides)
    assert result.paths and result.paths[0].is_file()
    assert result.images[0].size == (32, 32)
    again = gesso.run({"model": str(tiny["combined"]), "prompt": "a lighthouse"}, overrides[1:], write=False)
    np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
