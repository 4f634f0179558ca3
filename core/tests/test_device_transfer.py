"""Safetensors files copied straight to a device, the CUDA runtime wrapper, and ``device_map``."""

from __future__ import annotations

import pytest
import torch
from gesso import device_transfer
from gesso.device_transfer import CudaRuntime
from gesso.weights import WeightsError, load_safetensors_to_device
from safetensors.torch import load_file, save_file


@pytest.fixture
def weights_file(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(512, 1024, generator=generator),  # 2 MiB of float32
        "half": torch.randn(3, 5, generator=generator).half(),
        "brain": torch.randn(7, generator=generator).bfloat16(),
        "ids": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "fp8": torch.randn(4, generator=generator).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def copy_on_cpu(path, float_dtype=None):
    """The straight-from-the-file path, with the CPU standing in for the GPU."""
    return load_safetensors_to_device(path, torch.device("cpu"), float_dtype)


def test_copies_from_the_file_equal_the_reference_reader(weights_file):
    copied, read = copy_on_cpu(weights_file), load_file(str(weights_file))
    assert copied.keys() == read.keys()
    for name, tensor in read.items():
        assert copied[name].dtype == tensor.dtype and copied[name].shape == tensor.shape, name
        assert torch.equal(copied[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_copies_own_their_memory(weights_file):
    before = weights_file.read_bytes()
    copied = copy_on_cpu(weights_file)
    copied["big"].add_(1.0)  # the read-only mapping of the file is not behind it
    assert weights_file.read_bytes() == before


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[:-20], "tensor '\\w+' runs past the end of the file; the file may be truncated"),
        (lambda data: data[:6], "no valid safetensors header"),
        (lambda data: data[:8] + b"{not json" + data[17:], "header is not JSON"),
        (lambda data: (2).to_bytes(8, "little") + b"[]", "the header is not a JSON object"),
    ],
    ids=["truncated-data", "truncated-header", "corrupt-header", "header-not-an-object"],
)
def test_damaged_files_are_refused_naming_the_file(weights_file, damage, message):
    weights_file.write_bytes(damage(weights_file.read_bytes()))
    with pytest.raises(WeightsError, match=rf"model\.safetensors: .*{message}"):
        copy_on_cpu(weights_file)


def test_floating_tensors_are_cast_as_they_arrive(weights_file):
    read = load_file(str(weights_file))
    copied = copy_on_cpu(weights_file, torch.float16)
    assert copied["big"].dtype == torch.float16 and torch.equal(copied["big"], read["big"].half())
    assert copied["ids"].dtype == torch.int64 and copied["mask"].dtype == torch.bool


class FakeLibrary:
    """Stands in for the CUDA runtime: refuses every region and records the calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.cudaHostRegister = self._call("register", 1)
        self.cudaHostUnregister = self._call("unregister", 1)
        self.cudaGetLastError = self._call("clear", 0)

    def _call(self, name, result):
        def call(*args):
            self.calls.append(name)
            return result

        return call


def test_a_refused_lock_clears_the_runtime_error():
    library = FakeLibrary()
    runtime = CudaRuntime(library)
    assert runtime.lock(4096, 4096) is False
    runtime.unlock(4096)
    assert library.calls == ["register", "clear", "unregister", "clear"]


@pytest.mark.parametrize("device_map", ["balanced", "auto", {"": 0}])
def test_placement_strategies_are_refused_by_name(tiny_checkpoint, device_map):
    from gesso import AutoPipelineForText2Image

    with pytest.raises(ValueError, match=rf"device_map={device_map!r} is not supported: pass one device"):
        AutoPipelineForText2Image.from_pretrained(tiny_checkpoint("sd15"), device_map=device_map)


def test_device_map_loads_the_same_pipeline(tiny_checkpoint):
    from gesso import AutoPipelineForText2Image

    folder = tiny_checkpoint("sd15")
    default = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16)
    placed = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=torch.float16, device_map="cpu")
    for (name, module), (_, other) in zip(default.modules(), placed.modules(), strict=True):
        for (key, tensor), (_, copy) in zip(module.state_dict().items(), other.state_dict().items(), strict=True):
            assert copy.dtype == tensor.dtype and torch.equal(copy, tensor), f"{name}.{key}"


def clip_text_encoder_folder(tmp_path, extra: dict | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=99)
    model = CLIPTextModel(config).eval()
    model.save_pretrained(tmp_path)
    if extra:
        weights = tmp_path / "model.safetensors"
        save_file({**load_file(str(weights)), **extra}, str(weights), metadata={"format": "pt"})
    return model, tmp_path


def test_another_librarys_module_takes_its_weights_from_the_files(tmp_path):
    from gesso.pipeline_loading import assign_weights_from_files

    model, folder = clip_text_encoder_folder(tmp_path, extra={"text_model.embeddings.position_ids": torch.arange(77)[None]})
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    for tensor in model.parameters():
        tensor.data.zero_()  # what the files give back must replace these
    assert assign_weights_from_files(model, [folder / "model.safetensors"], torch.device("cpu"))
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[key]), key
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())


def test_files_that_do_not_fit_leave_the_module_alone(tmp_path):
    from gesso.pipeline_loading import assign_weights_from_files

    model, folder = clip_text_encoder_folder(tmp_path)
    norm = next(k for k in model.state_dict() if k.endswith("final_layer_norm.weight")).removesuffix(".weight")
    model.set_submodule(norm, torch.nn.LayerNorm(33))  # a shape the file does not hold
    before = model.get_submodule(norm).weight
    assert not assign_weights_from_files(model, [folder / "model.safetensors"], torch.device("cpu"))
    assert model.get_submodule(norm).weight is before


def test_tied_weights_are_left_to_module_to(tmp_path):
    from gesso.pipeline_loading import assign_weights_from_files

    model, folder = clip_text_encoder_folder(tmp_path, extra={"tied.weight": torch.zeros(99, 32)})
    model.tied = torch.nn.Linear(32, 99, bias=False)
    assert assign_weights_from_files(model, [folder / "model.safetensors"], torch.device("cpu"))  # untied: taken from the file
    embedding = next(k for k in model.state_dict() if k.endswith("token_embedding.weight"))
    model.tied.weight = model.get_parameter(embedding)  # now they share memory
    assert not assign_weights_from_files(model, [folder / "model.safetensors"], torch.device("cpu"))
    assert model.tied.weight is model.get_parameter(embedding)


def test_page_locked_falls_back_to_plain_memory_when_refused(monkeypatch, caplog):
    real_empty = torch.empty

    def refuse_to_lock(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("cudaHostAlloc: out of memory")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", refuse_to_lock)
    monkeypatch.setattr(device_transfer, "_refusal_reported", False)
    with caplog.at_level("WARNING", logger="gesso"):
        block = device_transfer.page_locked((1024,), torch.uint8)
        device_transfer.page_locked((2048,), torch.uint8)  # a second refused block is not reported again
    assert block.numel() == 1024 and not block.is_pinned()
    assert "page-locked memory refused" in caplog.text and "out of memory" in caplog.text
    assert caplog.text.count("page-locked memory refused") == 1
