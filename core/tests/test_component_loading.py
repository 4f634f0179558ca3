"""How a pipeline loads and saves a component, by its class: gesso's own modules read their weights
straight onto the device, another library's module goes through that library's loader, and every
class is saved under the ``library`` the reference loads it from."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
import transformers
from gesso import clip
from gesso.builtin import TRANSFORMERS_CLASSES
from gesso.contract import Component
from gesso.pipeline_loading import library_of, load_component
from gesso.plugins import get_host
from gesso.tiny import tiny_clip_text_config


def registry_with(class_name: str, target: Any) -> SimpleNamespace:
    return SimpleNamespace(components={("transformers", class_name): Component("transformers", class_name, target)})


def test_transformers_clip_pairs_load_with_gesso_classes():
    components = get_host().registry.components
    for name, ours in TRANSFORMERS_CLASSES.items():
        assert components[("transformers", name)].load_class() is getattr(clip, ours), name


class SpyTextModel(clip.CLIPTextModel):
    """gesso's text encoder, recording the options a pipeline loads it with."""

    calls: ClassVar[list[dict[str, Any]]] = []

    @classmethod
    def from_pretrained(cls, path: Any, **options: Any) -> Any:
        cls.calls.append(options)
        return super().from_pretrained(path, **options)


def test_gesso_modules_take_dtype_and_device_directly(tiny_checkpoint):
    folder = tiny_checkpoint("sd15")
    SpyTextModel.calls.clear()
    registry = registry_with("CLIPTextModel", SpyTextModel)
    model = load_component(
        registry, folder, "text_encoder", "transformers", "CLIPTextModel", torch.float16, None, None, torch.device("cpu")
    )
    assert SpyTextModel.calls == [
        {"torch_dtype": torch.float16, "variant": None, "use_safetensors": None, "device_map": torch.device("cpu")}
    ]
    assert type(model) is SpyTextModel and model.dtype == torch.float16


def test_a_registered_transformers_class_loads_through_transformers(tiny_checkpoint):
    """What a plugin registering another transformers class relies on: that library's own loader,
    the pipeline's dtype, then placement on the device."""
    folder = tiny_checkpoint("sd15")
    registry = registry_with("CLIPTextModel", "transformers:CLIPTextModel")
    theirs = load_component(
        registry, folder, "text_encoder", "transformers", "CLIPTextModel", torch.float16, None, None, torch.device("cpu")
    )
    assert isinstance(theirs, transformers.CLIPTextModel) and theirs.dtype == torch.float16
    ours = clip.CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float16)
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids)[0].float(), ours(ids)[0].float(), atol=2e-3, rtol=0)


def test_each_class_is_saved_under_the_library_the_reference_loads_it_from(tiny_checkpoint):
    from gesso.nn import UNet2DConditionModel
    from gesso.schedulers import PNDMScheduler

    folder = tiny_checkpoint("sd15")
    ours = [
        clip.CLIPTextModel.from_pretrained(folder / "text_encoder"),
        clip.CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        clip.CLIPImageProcessor(),
    ]
    assert [library_of(value) for value in ours] == ["transformers"] * 3
    assert library_of(transformers.CLIPTextModel(tiny_clip_text_config())) == "transformers"  # passed in by a user
    assert library_of(UNet2DConditionModel.from_pretrained(folder / "unet")) == "diffusers"
    assert library_of(PNDMScheduler.from_pretrained(folder / "scheduler")) == "diffusers"

    class Declared:
        model_index_library = "mylib"

    assert library_of(Declared()) == "mylib"


@pytest.mark.parametrize(
    ("change", "message"), [({"hidden_act": "swish2"}, "hidden_act 'swish2'"), ({"hidden_size": 31}, "hidden_size 31 is not a multiple")]
)
def test_a_bad_encoder_config_names_the_file(tiny_checkpoint, tmp_path, change, message):
    import json
    import re
    import shutil

    folder = tmp_path / "text_encoder"
    shutil.copytree(tiny_checkpoint("sd15") / "text_encoder", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(folder / 'config.json'))}: {re.escape(message)}") as error:
        clip.CLIPTextModel.from_pretrained(folder)
    assert "\n" not in str(error.value)
