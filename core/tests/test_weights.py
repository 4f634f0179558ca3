"""Weight files: single, sharded, variants, .bin fallback, and errors naming the file and tensor."""

from __future__ import annotations

import json

import pytest
import torch
from gesso.configuration import register_to_config
from gesso.modeling import ModelMixin
from gesso.weights import WeightsError, find_weight_files


class TinyModel(ModelMixin):
    @register_to_config
    def __init__(self, width: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def random_model(**config) -> TinyModel:
    torch.manual_seed(0)
    return TinyModel(**config)


def test_round_trip_is_exact_and_builds_no_random_weights(tmp_path, monkeypatch):
    model = random_model()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "TinyModel"
    initialised_devices = []
    real_init = torch.nn.init.kaiming_uniform_
    monkeypatch.setattr(
        torch.nn.init,
        "kaiming_uniform_",
        lambda tensor, *a, **k: initialised_devices.append(tensor.device.type) or real_init(tensor, *a, **k),
    )
    loaded = TinyModel.from_pretrained(tmp_path)
    assert set(initialised_devices) == {"meta"}  # constructed on the meta device: no random numbers drawn
    x = torch.randn(3, 4)
    assert torch.equal(loaded(x), model(x))
    assert loaded.config.depth == 2


def test_sharded_weights_with_index(tmp_path):
    model = random_model(width=8, depth=4)
    model.save_pretrained(tmp_path, max_shard_size=400)
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(find_weight_files(tmp_path, "diffusion_pytorch_model")) > 1
    x = torch.randn(2, 8)
    assert torch.equal(TinyModel.from_pretrained(tmp_path)(x), model(x))


def test_variant_files_and_sharded_variant(tmp_path):
    model = random_model(width=8, depth=4).to(torch.float16)
    model.save_pretrained(tmp_path / "single", variant="fp16")
    assert (tmp_path / "single" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    model.save_pretrained(tmp_path / "sharded", variant="fp16", max_shard_size=200)
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    for folder in ("single", "sharded"):
        loaded = TinyModel.from_pretrained(tmp_path / folder, variant="fp16", torch_dtype=torch.float16)
        assert loaded.dtype == torch.float16
        assert torch.equal(loaded.layers[0].weight, model.layers[0].weight)
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.safetensors"):
        TinyModel.from_pretrained(tmp_path / "single")  # asked for no variant, only fp16 exists


def test_bin_weights_only_when_no_safetensors(tmp_path):
    model = random_model()
    model.save_config(tmp_path)
    torch.save(model.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    x = torch.randn(1, 4)
    assert torch.equal(TinyModel.from_pretrained(tmp_path)(x), model(x))
    with pytest.raises(WeightsError, match="no weights found"):
        TinyModel.from_pretrained(tmp_path, use_safetensors=True)


def test_truncated_file_names_the_file(tmp_path):
    random_model().save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-20])
    with pytest.raises(WeightsError, match="diffusion_pytorch_model.safetensors.*truncated"):
        TinyModel.from_pretrained(tmp_path)


def test_shape_disagreeing_with_config_names_the_tensor(tmp_path):
    random_model(width=4).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["width"] = 6
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"'layers\.0\.weight' has shape \(4, 4\).*\(6, 6\)"):
        TinyModel.from_pretrained(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    random_model(depth=1).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["depth"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"'layers\.1\.weight' is missing"):
        TinyModel.from_pretrained(tmp_path)


def test_missing_shard_is_named(tmp_path):
    random_model(width=8, depth=4).save_pretrained(tmp_path, max_shard_size=400)
    shard = sorted(tmp_path.glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(WeightsError, match=shard.name):
        TinyModel.from_pretrained(tmp_path)


def test_config_is_read_only_and_from_config_overrides():
    model = random_model()
    with pytest.raises(TypeError, match="read-only"):
        model.config["width"] = 3
    other = TinyModel.from_config(model.config, depth=3, stale_key=1)
    assert other.config.depth == 3 and other.config.width == 4
