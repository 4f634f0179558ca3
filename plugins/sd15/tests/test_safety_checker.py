"""gesso's safety checker against the reference's (the oracle): the same files, flags and images, both ways."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from gesso.weights import WeightsError
from gesso_sd15.safety_checker import StableDiffusionSafetyChecker
from gesso_sd15.tiny import randomise, tiny_safety_checker_config
from safetensors.torch import load_file, save_file

diffusers_checker = pytest.importorskip("diffusers.pipelines.stable_diffusion.safety_checker")
Reference = diffusers_checker.StableDiffusionSafetyChecker

CLIP_INPUT = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def image_embeds(checker: Any, clip_input: torch.Tensor = CLIP_INPUT) -> torch.Tensor:
    with torch.no_grad():
        return checker.visual_projection(checker.vision_model(clip_input)[1])


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checker saved by the reference, with thresholds set on ``CLIP_INPUT``'s scores: half the
    inputs are special-care ones (threshold at the median score), and the input with the highest
    special-care score is flagged only thanks to the 0.01 adjustment that gives (its concept threshold
    is 0.005 above its score)."""
    torch.manual_seed(0)
    checker = Reference(tiny_safety_checker_config()).eval()
    randomise(checker, 1)
    with torch.no_grad():
        embeds = torch.nn.functional.normalize(image_embeds(checker))
        concept = embeds @ torch.nn.functional.normalize(checker.concept_embeds).T
        special = embeds @ torch.nn.functional.normalize(checker.special_care_embeds).T
        checker.special_care_embeds_weights.fill_(1.0)
        checker.special_care_embeds_weights[0] = special[:, 0].median()
        checker.concept_embeds_weights.fill_(1.0)
        checker.concept_embeds_weights[1] = concept[special[:, 0].argmax(), 1] + 0.005
    folder = tmp_path_factory.mktemp("reference-checker")
    checker.save_pretrained(folder)
    return folder


def published_layout(source: Path, target: Path) -> Path:
    """The layout of the published SD1.5 checker: the tower under ``vision_model.vision_model.*``
    and the stale ``position_ids`` buffer older transformers wrote."""
    shutil.copytree(source, target)
    state = load_file(source / "model.safetensors")
    published = {("vision_model." + key if key.startswith("vision_model.") else key): tensor for key, tensor in state.items()}
    positions = published["vision_model.vision_model.embeddings.position_embedding.weight"].shape[0]
    published["vision_model.vision_model.embeddings.position_ids"] = torch.arange(positions)[None]
    save_file(published, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def assert_same_results(ours: Any, reference: Any) -> None:
    torch.testing.assert_close(image_embeds(ours), image_embeds(reference), atol=1e-5, rtol=0)
    images = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    checked, flags = ours(images=images.clone(), clip_input=CLIP_INPUT)
    expected_images, expected = reference(images=images.clone(), clip_input=CLIP_INPUT)
    assert flags == expected
    assert any(flags) and not all(flags), "the thresholds should flag some inputs and pass others"
    assert torch.equal(checked, expected_images)


@pytest.mark.parametrize("layout", ["written by the reference", "published"])
def test_loads_the_references_files_and_flags_alike(reference_folder, tmp_path, layout):
    folder = reference_folder if layout == "written by the reference" else published_layout(reference_folder, tmp_path / "published")
    ours = StableDiffusionSafetyChecker.from_pretrained(folder)
    reference = Reference.from_pretrained(folder).eval()
    assert_same_results(ours, reference)
    assert not ours.training


def test_special_care_adjustment_changes_a_flag(reference_folder):
    """The 0.01 special-care adjustment is exercised: without the special-care concept some input flips."""
    ours = StableDiffusionSafetyChecker.from_pretrained(reference_folder)
    with torch.no_grad():
        flags = ours.flagged(CLIP_INPUT)
        ours.special_care_embeds_weights.fill_(1.0)
        assert ours.flagged(CLIP_INPUT) != flags


def test_saved_files_load_in_the_reference(reference_folder, tmp_path):
    ours = StableDiffusionSafetyChecker.from_pretrained(reference_folder)
    ours.save_pretrained(tmp_path / "saved")
    keys = set(load_file(tmp_path / "saved" / "model.safetensors"))
    assert "vision_model.vision_model.post_layernorm.weight" in keys and "visual_projection.weight" in keys
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architectures"] == ["StableDiffusionSafetyChecker"] and config["model_type"] == "clip"
    reference, info = Reference.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_same_results(StableDiffusionSafetyChecker.from_pretrained(tmp_path / "saved"), reference.eval())
    ours.half().save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "model.fp16.safetensors").is_file()
    fp16 = StableDiffusionSafetyChecker.from_pretrained(tmp_path / "fp16", variant="fp16", dtype="auto")
    assert {p.dtype for p in fp16.parameters()} == {torch.float16}
    reference = Reference.from_pretrained(tmp_path / "fp16", variant="fp16", torch_dtype=torch.float16)
    torch.testing.assert_close(image_embeds(fp16, CLIP_INPUT.half()), image_embeds(reference, CLIP_INPUT.half()), atol=1e-2, rtol=0)


def test_loading_options(reference_folder, tmp_path):
    assert StableDiffusionSafetyChecker.from_pretrained(reference_folder).dtype == torch.float32
    half = StableDiffusionSafetyChecker.from_pretrained(reference_folder, torch_dtype=torch.float16, device_map="cpu")
    assert {p.dtype for p in half.parameters()} == {torch.float16} and half.device == torch.device("cpu")
    with pytest.raises(WeightsError, match=r"no weights found, expected model\.fp16\.safetensors"):
        StableDiffusionSafetyChecker.from_pretrained(reference_folder, variant="fp16")
    assert StableDiffusionSafetyChecker.from_pretrained(reference_folder, use_safetensors=True).config == half.config


def test_a_missing_tensor_is_named(reference_folder, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(reference_folder, folder)
    state = load_file(folder / "model.safetensors")
    del state["concept_embeds"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=rf"^{re.escape(str(folder / 'model.safetensors'))}: tensor 'concept_embeds' is missing$"):
        StableDiffusionSafetyChecker.from_pretrained(folder)


def test_a_bad_config_names_the_file(reference_folder, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(reference_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["num_attention_heads"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(folder / 'config.json'))}: hidden_size 16 is not a multiple of num_attention_heads 5$"
    ):
        StableDiffusionSafetyChecker.from_pretrained(folder)
