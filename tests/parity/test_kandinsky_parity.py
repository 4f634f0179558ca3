"""Kandinsky 2.2: same checkpoint, arguments and seed give gesso the reference's image (float32, CPU).

Checkpoints are written by the reference's own ``save_pretrained`` (tiny random configs) in its
three layouts; gesso loads them as a combined folder, as a decoder folder plus ``prior=``, and as a
decoder Hub repository (in a local Hub cache) whose model card names its prior.
"""

from __future__ import annotations

import inspect
import json
import shutil

import numpy as np
import pytest
import torch
from gesso import AutoPipelineForText2Image

from tests.parity.reference_kandinsky import write_reference_kandinsky

ATOL = 1e-3  # per pixel on [0, 1]
STEPS = {"num_inference_steps": 2, "prior_num_inference_steps": 3}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_reference_kandinsky(tmp_path_factory.mktemp("ref-kandinsky"))


@pytest.fixture(scope="module")
def reference(checkpoints):
    import diffusers

    pipeline = diffusers.KandinskyV22CombinedPipeline.from_pretrained(checkpoints["combined"])
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def ours(checkpoints):
    return AutoPipelineForText2Image.from_pretrained(checkpoints["combined"])


_EXPECTED: dict[str, np.ndarray] = {}


def generate(pipeline, seed=0, **kwargs):
    options = {**STEPS, "output_type": "np", "height": 32, "width": 32, **kwargs}
    return pipeline(generator=torch.Generator().manual_seed(seed), **options)


def expected(reference, case: str) -> np.ndarray:
    """The reference's image for a case, computed once per session."""
    if case not in _EXPECTED:
        _EXPECTED[case] = generate(reference, **CASES[case]).images
    return _EXPECTED[case]


CASES = {
    "single prompt": {"prompt": "an astronaut riding a horse"},
    "negative prompts": {"prompt": ["a cat", "a dog"], "negative_prompt": ["blurry", "ugly, deformed"]},
    "negative prompt, non-square, images per prompt": {
        "prompt": "a tall tower",
        "negative_prompt": "low quality",
        "height": 48,
        "width": 32,
        "num_images_per_prompt": 2,
    },
    "non-square size rounded up": {"prompt": "a wide field", "height": 30, "width": 52},
    "no guidance": {"prompt": "a cat", "guidance_scale": 1.0, "prior_guidance_scale": 1.0},
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_same_image_as_reference_from_combined_folder(reference, ours, case):
    want = expected(reference, case)
    got = generate(ours, **CASES[case]).images
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_conditioning_matters(reference, ours):
    """The images depend on the prompt and on the negative prompt (a parity of constants would prove nothing)."""
    cat = generate(ours, prompt="a cat").images
    dog = generate(ours, prompt="a dog").images
    negative = generate(ours, prompt="a cat", negative_prompt="a dog").images
    assert np.abs(cat - dog).max() > 1e-2
    assert np.abs(cat - negative).max() > 1e-2


@pytest.mark.parametrize("how", ["path", "loaded pipeline"])
def test_decoder_folder_with_prior_argument(reference, checkpoints, how):
    from gesso_kandinsky.pipeline import KandinskyV22CombinedPipeline, KandinskyV22PriorPipeline

    prior = checkpoints["prior"] if how == "path" else KandinskyV22PriorPipeline.from_pretrained(checkpoints["prior"])
    pipeline = AutoPipelineForText2Image.from_pretrained(checkpoints["decoder"], prior=prior)
    assert isinstance(pipeline, KandinskyV22CombinedPipeline)
    case = "negative prompt, non-square, images per prompt"
    np.testing.assert_allclose(generate(pipeline, **CASES[case]).images, expected(reference, case), atol=ATOL, rtol=0)
    direct = KandinskyV22CombinedPipeline.from_pretrained(checkpoints["decoder"], prior=prior)
    np.testing.assert_allclose(generate(direct, **CASES["single prompt"]).images, expected(reference, "single prompt"), atol=ATOL, rtol=0)


def _cache_repo(cache, repo: str, source, extra: dict[str, str] | None = None, revision: str = "0123abcd") -> None:
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source, root / "snapshots" / revision)
    for name, text in (extra or {}).items():
        (root / "snapshots" / revision / name).write_text(text, encoding="utf-8")
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)


def test_decoder_hub_repo_names_its_prior_in_the_model_card(reference, checkpoints, tmp_path, monkeypatch):
    """One AutoPipeline call on the decoder's Hub id loads the prior its README front matter names."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    card = "---\nlicense: apache-2.0\nprior:\n- test-org/kandinsky-2-2-prior\ntags:\n- text-to-image\n---\n\n# decoder\n"
    _cache_repo(tmp_path, "test-org/kandinsky-2-2-decoder", checkpoints["decoder"], {"README.md": card})
    _cache_repo(tmp_path, "test-org/kandinsky-2-2-prior", checkpoints["prior"], revision="4567ef01")
    pipeline = AutoPipelineForText2Image.from_pretrained("test-org/kandinsky-2-2-decoder", cache_dir=tmp_path)
    assert pipeline.prior_prior is not None and pipeline.prior_text_encoder is not None
    case = "negative prompts"
    np.testing.assert_allclose(generate(pipeline, **CASES[case]).images, expected(reference, case), atol=ATOL, rtol=0)


def test_decoder_without_prior_is_refused_clearly(checkpoints):
    pipeline = AutoPipelineForText2Image.from_pretrained(checkpoints["decoder"])
    with pytest.raises(ValueError, match="has no prior.*prior="):
        generate(pipeline, prompt="a cat")


def test_prior_given_at_call_time(reference, checkpoints):
    pipeline = AutoPipelineForText2Image.from_pretrained(checkpoints["decoder"])
    got = generate(pipeline, prior=str(checkpoints["prior"]), **CASES["single prompt"]).images
    np.testing.assert_allclose(got, expected(reference, "single prompt"), atol=ATOL, rtol=0)


def test_prior_pipeline_matches_reference(checkpoints):
    import diffusers
    from gesso_kandinsky.pipeline import KandinskyV22PriorPipeline

    reference = diffusers.KandinskyV22PriorPipeline.from_pretrained(checkpoints["prior"])
    reference.set_progress_bar_config(disable=True)
    ours = KandinskyV22PriorPipeline.from_pretrained(checkpoints["prior"])
    for kwargs in ({"prompt": ["a cat", "a dog"]}, {"prompt": "a cat", "negative_prompt": "blurry", "num_images_per_prompt": 2}):
        want = reference(**kwargs, num_inference_steps=4, generator=torch.Generator().manual_seed(3))
        got = ours(**kwargs, num_inference_steps=4, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(got.image_embeds, want.image_embeds, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.negative_image_embeds, want.negative_image_embeds, atol=1e-5, rtol=1e-4)
    # the default negative: the vision encoder's embedding of an all-zero image
    torch.testing.assert_close(ours.get_zero_embed(2), reference.get_zero_embed(2))


def test_decoder_pipeline_matches_reference(checkpoints):
    import diffusers
    from gesso_kandinsky.pipeline import KandinskyV22Pipeline

    reference = diffusers.KandinskyV22Pipeline.from_pretrained(checkpoints["decoder"])
    reference.set_progress_bar_config(disable=True)
    ours = KandinskyV22Pipeline.from_pretrained(checkpoints["decoder"])
    g = torch.Generator().manual_seed(4)
    embeds, negative = torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g)
    kwargs = {"height": 40, "width": 32, "num_inference_steps": 3, "output_type": "np"}
    want = reference(embeds, negative, generator=torch.Generator().manual_seed(5), **kwargs).images
    got = ours(embeds, negative, generator=torch.Generator().manual_seed(5), **kwargs).images
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("output_type", ["pt", "latent", "pil"])
def test_output_types(reference, ours, output_type):
    want = generate(reference, prompt="a cat", output_type=output_type).images
    got = generate(ours, prompt="a cat", output_type=output_type).images
    if output_type == "pil":
        left, right = np.asarray(got[0], dtype=np.int16), np.asarray(want[0], dtype=np.int16)
        assert np.abs(left - right).max() <= 1
    else:
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_callbacks_see_and_replace_tensors(reference, ours):
    seen: dict[str, list] = {"ref": [], "ours": []}

    def prior_callback(tag):
        def callback(pipe, step, timestep, tensors):
            seen[tag].append(sorted(tensors))
            if step == 1:
                tensors["latents"] = tensors["latents"] * 0.5
            return tensors

        return callback

    def decoder_callback(tag):
        def callback(pipe, step, timestep, tensors):
            seen[tag].append((tuple(tensors["image_embeds"].shape), tuple(tensors["negative_image_embeds"].shape)))
            if step == 0:
                tensors["latents"] = tensors["latents"] * 0.5
                tensors["image_embeds"] = tensors["image_embeds"] * 2
            return tensors

        return callback

    def run(pipeline, tag):
        return generate(
            pipeline,
            prompt=["a cat", "a dog"],
            prior_callback_on_step_end=prior_callback(tag),
            prior_callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "text_encoder_hidden_states", "text_mask"],
            callback_on_step_end=decoder_callback(tag),
            callback_on_step_end_tensor_inputs=["latents", "image_embeds", "negative_image_embeds"],
        ).images

    want, got = run(reference, "ref"), run(ours, "ours")
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert seen["ours"] == seen["ref"]
    assert np.abs(got - expected(reference, "single prompt")[:1]).max() > 1e-3


def test_bad_callback_inputs_are_refused(ours):
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        generate(ours, prompt="a cat", callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_call_surface_and_defaults_match_reference():
    import diffusers
    from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2 import downscale_height_and_width as reference_downscale
    from gesso_kandinsky.pipeline import (
        KandinskyV22CombinedPipeline,
        KandinskyV22Pipeline,
        KandinskyV22PriorPipeline,
        downscale_height_and_width,
    )

    def defaults(function):
        return {
            n: p.default
            for n, p in inspect.signature(function).parameters.items()
            if n not in ("self", "kwargs", "callback", "callback_steps")
        }

    for ours_cls, ref_cls in (
        (KandinskyV22CombinedPipeline, diffusers.KandinskyV22CombinedPipeline),
        (KandinskyV22Pipeline, diffusers.KandinskyV22Pipeline),
        (KandinskyV22PriorPipeline, diffusers.KandinskyV22PriorPipeline),
    ):
        mine, theirs = defaults(ours_cls.__call__), defaults(ref_cls.__call__)
        mine.pop("prior", None)
        assert set(mine) == set(theirs), ref_cls.__name__
        for name, value in theirs.items():
            assert (list(mine[name]) if isinstance(mine[name], tuple) else mine[name]) == value, f"{ref_cls.__name__}.{name}"
    for size in ((512, 512), (500, 700), (768, 1024), (30, 52), (64, 65)):
        for factor in (2, 8):
            assert downscale_height_and_width(*size, factor) == reference_downscale(*size, factor)


def test_our_save_pretrained_loads_in_the_reference(ours, reference, tmp_path):
    """The layout gesso writes is the reference's: the reference loads it and makes the same image."""
    import diffusers

    ours.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "KandinskyV22CombinedPipeline"
    assert index["movq"] == ["diffusers", "VQModel"] and index["prior_prior"] == ["diffusers", "PriorTransformer"]
    reloaded = diffusers.KandinskyV22CombinedPipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(generate(reloaded, **CASES["single prompt"]).images, expected(reference, "single prompt"), atol=ATOL, rtol=0)
