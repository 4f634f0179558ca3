"""Model references: local folders, Hub ids through a local cache layout, moved repositories."""

from __future__ import annotations

import json

import pytest
from gesso.loading import ModelNotFoundError, resolve, resolve_pipeline, select_files

REPO_FILES = [
    "model_index.json",
    "README.md",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.bin",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "safety_checker/pytorch_model.bin",
    "safety_checker/config.json",
    "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors",
]


def test_select_prefers_variant_then_safetensors_then_bin():
    chosen = select_files(REPO_FILES, ["unet", "vae", "text_encoder", "tokenizer", "safety_checker"], "fp16", None)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in chosen
    assert "unet/diffusion_pytorch_model.safetensors" not in chosen
    assert "vae/diffusion_pytorch_model.safetensors" in chosen  # no fp16 there: the default weights
    assert "vae/diffusion_pytorch_model.bin" not in chosen
    assert "safety_checker/pytorch_model.bin" in chosen  # only .bin exists
    assert "tokenizer/merges.txt" in chosen and "model_index.json" in chosen
    assert not any(name.startswith("v1-5-pruned") for name in chosen)
    assert "unet/diffusion_pytorch_model.non_ema.safetensors" not in chosen


def test_select_without_variant_and_safetensors_only():
    chosen = select_files(REPO_FILES, ["unet", "safety_checker"], None, True)
    assert "unet/diffusion_pytorch_model.safetensors" in chosen
    assert "unet/diffusion_pytorch_model.fp16.safetensors" not in chosen
    assert not any(name.startswith("safety_checker/") and name.endswith(".bin") for name in chosen)


def make_cache(root, repo: str, files: dict[str, str], revision: str = "abc123") -> None:
    folder = root / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / revision
    for name, text in files.items():
        path = snapshot / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)


def test_hub_id_resolves_from_local_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    make_cache(
        tmp_path,
        "org/model",
        {"model_index.json": json.dumps(index), "unet/config.json": "{}", "unet/diffusion_pytorch_model.safetensors": ""},
    )
    folder = resolve_pipeline("org/model", cache_dir=tmp_path)
    assert (folder / "unet" / "config.json").is_file()
    assert folder.name == "abc123"


def test_moved_repository_still_resolves(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    index = {"_class_name": "StableDiffusionPipeline"}
    make_cache(tmp_path, "stable-diffusion-v1-5/stable-diffusion-v1-5", {"model_index.json": json.dumps(index)})
    folder = resolve_pipeline("runwayml/stable-diffusion-v1-5", cache_dir=tmp_path)
    assert "stable-diffusion-v1-5--stable-diffusion-v1-5" in str(folder)


def test_hub_id_without_cache_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="'org/absent'.*not in the local cache"):
        resolve_pipeline("org/absent", cache_dir=tmp_path)


def test_missing_local_path_and_file_instead_of_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve(str(tmp_path / "nope" / "deeper"))
    (tmp_path / "file.safetensors").write_text("")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve(str(tmp_path / "file.safetensors"))


def test_folder_without_model_index_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        from gesso.loading import read_model_index

        read_model_index(tmp_path)
