"""gesso's CLIP image processor against transformers' (its PIL backend, the one used without
torchvision) on the same ``preprocessor_config.json``: pixel values must be identical."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from gesso.clip.image_processor import CLIPImageProcessor, ImageProcessorConfigError

transformers = pytest.importorskip("transformers")

# SD 1.5's safety-checker feature extractor, in its original (feature-extractor era) spelling.
SD15_FEATURE_EXTRACTOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}
CONFIGS = {
    "sd15": SD15_FEATURE_EXTRACTOR,
    # A fixed (non-square) resize, a crop inside it, bilinear, other statistics.
    "fixed": {
        "size": {"height": 61, "width": 47},
        "crop_size": {"height": 40, "width": 45},
        "resample": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "rescale_factor": 0.00392156862745098,
        "image_processor_type": "CLIPImageProcessor",
    },
    # A crop larger than the resized image (zero padding), Lanczos, odd sizes.
    "padded": {"size": {"shortest_edge": 57}, "crop_size": 64, "resample": 1},
    "capped": {"size": {"shortest_edge": 40, "longest_edge": 50}, "do_center_crop": False, "do_normalize": False},
}


def sample_images() -> list[object]:
    rng = np.random.default_rng(0)

    def rgb(height: int, width: int) -> PIL.Image.Image:
        return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))

    palette = PIL.Image.fromarray(rng.integers(0, 256, (50, 60), dtype=np.uint8), "L").convert("P")
    palette.info["transparency"] = 3
    return [
        *(rgb(h, w) for h, w in [(300, 451), (224, 224), (100, 37), (37, 100), (223, 225), (1, 1), (5, 600), (301, 224)]),
        PIL.Image.fromarray(rng.integers(0, 256, (80, 120, 4), dtype=np.uint8), "RGBA"),
        PIL.Image.fromarray(rng.integers(0, 256, (90, 70), dtype=np.uint8), "L"),
        PIL.Image.fromarray(rng.integers(0, 256, (90, 70, 2), dtype=np.uint8), "LA"),
        palette,
        rng.integers(0, 256, (120, 90, 3), dtype=np.uint8),  # HWC uint8
        rng.random((120, 90, 3)).astype(np.float32),  # HWC floats in [0, 1]
        rng.random((3, 50, 70)),  # CHW float64
        rng.integers(0, 256, (64, 48, 4), dtype=np.uint8),
        rng.random((64, 48, 4)).astype(np.float32),
        rng.integers(0, 256, (64, 48, 1), dtype=np.uint8),
        np.round(rng.random((40, 30, 3)) * 255),  # integer-valued floats are taken as 0..255
        torch.from_numpy(rng.integers(0, 256, (3, 40, 60), dtype=np.uint8)),
    ]


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory) -> tuple[CLIPImageProcessor, object]:
    folder = tmp_path_factory.mktemp(request.param)
    (folder / "preprocessor_config.json").write_text(json.dumps(CONFIGS[request.param]))
    return CLIPImageProcessor.from_pretrained(folder), transformers.CLIPImageProcessorPil.from_pretrained(folder)


def test_pixel_values_equal_reference(pair):
    mine, reference = pair
    for index, image in enumerate(sample_images()):
        try:
            want = reference(image, return_tensors="pt").pixel_values
        except ValueError:  # e.g. a 5x600 image capped to 50 wide is 0 pixels high
            with pytest.raises(ValueError):
                mine(image, return_tensors="pt")
            continue
        got = mine(image, return_tensors="pt").pixel_values
        assert got.dtype == want.dtype and got.shape == want.shape, index
        assert torch.equal(got, want), f"image {index}: max difference {(got - want).abs().max()}"
    unbatched = mine(sample_images()[:3]).pixel_values
    assert all(np.array_equal(a, b) for a, b in zip(unbatched, reference(sample_images()[:3]).pixel_values))


def test_pipeline_batch_of_pil_images(pair):
    """What the SD safety check passes: a list of PIL images, ``return_tensors="pt"``."""
    mine, reference = pair
    images = [PIL.Image.fromarray(np.full((64, 96, 3), value, np.uint8)) for value in (0, 128, 255)]
    got = mine(images, return_tensors="pt")
    assert torch.equal(got.pixel_values, reference(images, return_tensors="pt").pixel_values)
    assert got["pixel_values"].shape[0] == 3 and got.to(torch.float16).pixel_values.dtype == torch.float16
    batch = np.stack([np.asarray(i) for i in images])  # a 4-D array is a batch
    assert torch.equal(mine(batch, return_tensors="pt").pixel_values, reference(batch, return_tensors="pt").pixel_values)


def test_save_pretrained_reloads_in_both(pair, tmp_path):
    mine, reference = pair
    mine.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "CLIPImageProcessor"
    assert saved.get("feature_extractor_type") == getattr(reference, "feature_extractor_type", saved.get("feature_extractor_type"))
    again = transformers.CLIPImageProcessorPil.from_pretrained(tmp_path)
    images = sample_images()[:4]
    want = reference(images).pixel_values  # a list: without a crop the sizes differ
    for got in (again(images).pixel_values, CLIPImageProcessor.from_pretrained(tmp_path)(images).pixel_values):
        assert len(got) == len(want) and all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got, want))
    assert again.to_dict()["size"] == reference.to_dict()["size"] and again.to_dict()["crop_size"] == reference.to_dict()["crop_size"]


def test_legacy_keys_are_kept(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "preprocessor_config.json").write_text(json.dumps(SD15_FEATURE_EXTRACTOR))
    CLIPImageProcessor.from_pretrained(tmp_path / "in").save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert saved["feature_extractor_type"] == "CLIPFeatureExtractor"
    assert saved["size"] == {"shortest_edge": 224} and saved["crop_size"] == {"height": 224, "width": 224}


def test_keyword_construction_matches_reference():
    """As the tiny checkpoints build one: ``CLIPImageProcessor(crop_size=32, size=32)``."""
    mine, reference = CLIPImageProcessor(crop_size=32, size=32), transformers.CLIPImageProcessorPil(crop_size=32, size=32)
    images = sample_images()[:6]
    assert torch.equal(mine(images, return_tensors="pt").pixel_values, reference(images, return_tensors="pt").pixel_values)
    assert torch.equal(
        mine(images, return_tensors="pt", do_normalize=False).pixel_values,
        reference(images, return_tensors="pt", do_normalize=False).pixel_values,
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not valid JSON"),
        ("[]", "expected a JSON object"),
        ('{"size": {"w": 3}}', "size must be"),
        ('{"image_mean": "x"}', "image_mean"),
    ],
)
def test_bad_config_names_the_file(tmp_path, content, message):
    (tmp_path / "preprocessor_config.json").write_text(content)
    with pytest.raises(ImageProcessorConfigError, match=message) as info:
        CLIPImageProcessor.from_pretrained(tmp_path)
    assert "preprocessor_config.json" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(ImageProcessorConfigError, match="missing"):
        CLIPImageProcessor.from_pretrained(tmp_path)


def test_import_does_not_load_transformers():
    code = "import sys, gesso.clip.image_processor; print(sorted(m for m in ('transformers', 'tokenizers', 'regex', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
