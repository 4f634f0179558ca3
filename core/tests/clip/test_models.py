"""gesso's CLIP encoders against transformers' (the oracle): same files, same outputs, both directions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from gesso.clip.models import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from gesso.text_encoding import final_layer_norm
from gesso.tiny import randomise, tiny_clip_text_config
from gesso.weights import WeightsError
from safetensors.torch import load_file, save_file

ATOL = 1e-5
VOCAB = 2 * 256 + 6 + 2  # tiny_clip_text_config's vocabulary: its last two ids are bos and eos
LENGTH = 12


def text_config(eos: str = "last", hidden_act: str = "quick_gelu", layers: int = 3) -> Any:
    """``eos``: "last" (the modern config, eos = the last id), "middle" (eos an id below others in
    the prompts, so the first-eos and highest-id rules disagree) or "legacy" (eos_token_id 2)."""
    config = tiny_clip_text_config(layers=layers, projection_dim=24, hidden_act=hidden_act)
    config.num_attention_heads = 4
    if eos == "middle":
        config.eos_token_id = config.pad_token_id = 7
    elif eos == "legacy":
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 0, 2, 1
    return config


def vision_config(hidden_act: str = "quick_gelu") -> Any:
    return transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=3,
        image_size=32,
        patch_size=8,
        projection_dim=24,
        hidden_act=hidden_act,
    )


def prompts(config: Any, generator_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of 12, 7 and 4 tokens (bos ... eos), padded as the config's tokenizer pads:
    with the eos id (legacy SD checkpoints) or the pad id. Returns ids and the padding mask."""
    generator = torch.Generator().manual_seed(generator_seed)
    eos = VOCAB - 1 if config.eos_token_id == 2 else config.eos_token_id
    pad = eos if config.eos_token_id == 2 else config.pad_token_id
    ids = torch.randint(10, VOCAB - 2, (3, LENGTH), generator=generator)
    ids[:, 0] = VOCAB - 2
    mask = torch.zeros(3, LENGTH, dtype=torch.long)
    for row, length in enumerate((LENGTH, 7, 4)):
        ids[row, length - 1] = eos
        ids[row, length:] = pad
        mask[row, :length] = 1
    if config.eos_token_id not in (2, VOCAB - 1):
        ids[0, 3] = VOCAB - 1  # a higher id before the eos: only the first-eos rule finds the eos
    return ids, mask


def reference(cls: type, config: Any, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomise(model, seed)
    return model


def assert_close(actual: Any, expected: Any) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def assert_same_outputs(ours: Any, theirs: Any) -> None:
    """Every field transformers returns, by name and by position, hidden states included."""
    names = [name for name in theirs if name != "attentions"]
    assert list(ours.keys()) == names
    for name in names:
        if name == "hidden_states":
            assert len(ours.hidden_states) == len(theirs.hidden_states)
            for mine, other in zip(ours.hidden_states, theirs.hidden_states):
                assert_close(mine, other)
        else:
            assert_close(ours[name], theirs[name])
    assert_close(ours[1], theirs[1])


def prefixed_classic_file(folder: Path, prefix: str) -> None:
    """Rewrite a transformers-5 file in the layout of the published checkpoints: every key under the
    tower's prefix, plus the stale ``position_ids`` buffer older transformers wrote."""
    path = folder / "model.safetensors"
    state = load_file(path)
    classic = {(k if k.startswith(f"{prefix}.") or "projection" in k else f"{prefix}.{k}"): t for k, t in state.items()}
    length = state.get(f"{prefix}.embeddings.position_embedding.weight", state.get("embeddings.position_embedding.weight"))
    assert length is not None
    classic[f"{prefix}.embeddings.position_ids"] = torch.arange(length.shape[0])[None]
    save_file(classic, str(path), metadata={"format": "pt"})


# --- outputs agree with transformers ---------------------------------------------------------------


@pytest.mark.parametrize("layout", ["transformers5", "classic"])
@pytest.mark.parametrize(
    ("eos", "hidden_act"), [("last", "quick_gelu"), ("middle", "gelu"), ("legacy", "quick_gelu"), ("last", "gelu_new")]
)
def test_text_model_matches_transformers(tmp_path: Path, eos: str, hidden_act: str, layout: str) -> None:
    config = text_config(eos, hidden_act)
    theirs = reference(transformers.CLIPTextModel, config)
    theirs.save_pretrained(tmp_path)
    if layout == "classic":
        prefixed_classic_file(tmp_path, "text_model")
    ours = CLIPTextModel.from_pretrained(tmp_path)
    ids, mask = prompts(config)
    with torch.no_grad():
        for attention_mask in (None, mask, mask.flip(-1)):  # flipped: left padding, rows with nothing to attend to
            expected = theirs(ids, attention_mask=attention_mask, output_hidden_states=True)
            assert_same_outputs(ours(ids, attention_mask=attention_mask, output_hidden_states=True), expected)


def test_text_pooling_finds_the_eos_by_the_configs_rule(tmp_path: Path) -> None:
    """With a mid-vocabulary eos the pooled state is the first eos's, not the highest id's."""
    config = text_config("middle")
    reference(transformers.CLIPTextModel, config).save_pretrained(tmp_path)
    ours = CLIPTextModel.from_pretrained(tmp_path)
    ids, _ = prompts(config)
    with torch.no_grad():
        out = ours(ids)
    eos_positions = (ids == config.eos_token_id).int().argmax(-1)
    assert not torch.equal(eos_positions, ids.argmax(-1))
    assert_close(out.pooler_output, out.last_hidden_state[torch.arange(3), eos_positions])


@pytest.mark.parametrize("layout", ["transformers5", "classic"])
def test_text_model_with_projection_matches_transformers(tmp_path: Path, layout: str) -> None:
    config = text_config("last")
    theirs = reference(transformers.CLIPTextModelWithProjection, config, seed=1)
    theirs.save_pretrained(tmp_path)
    if layout == "classic":
        prefixed_classic_file(tmp_path, "text_model")
    ours = CLIPTextModelWithProjection.from_pretrained(tmp_path)
    ids, mask = prompts(config, 1)
    with torch.no_grad():
        for hidden in (False, True):
            expected = theirs(ids, attention_mask=mask, output_hidden_states=hidden)
            assert_same_outputs(ours(ids, attention_mask=mask, output_hidden_states=hidden), expected)


@pytest.mark.parametrize("layout", ["transformers5", "classic"])
@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_vision_model_matches_transformers(tmp_path: Path, projection: bool, hidden_act: str, layout: str) -> None:
    reference_cls, our_cls = (
        (transformers.CLIPVisionModelWithProjection, CLIPVisionModelWithProjection)
        if projection
        else (transformers.CLIPVisionModel, CLIPVisionModel)
    )
    theirs = reference(reference_cls, vision_config(hidden_act), seed=2)
    theirs.save_pretrained(tmp_path)
    if layout == "classic":
        prefixed_classic_file(tmp_path, "vision_model")
    ours = our_cls.from_pretrained(tmp_path)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_same_outputs(ours(pixels, output_hidden_states=True), theirs(pixels, output_hidden_states=True))
        assert_same_outputs(ours(pixels), theirs(pixels))


def test_towers_load_from_a_full_clip_checkpoint(tmp_path: Path) -> None:
    """A full CLIPModel folder (both towers, both projections, logit_scale): each tower takes its own part."""
    text = text_config("last").to_dict()
    vision = vision_config().to_dict()
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    clip = reference(transformers.CLIPModel, config, seed=3)
    clip.save_pretrained(tmp_path)
    ids, mask = prompts(text_config("last"), 3)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        text_embeds = CLIPTextModelWithProjection.from_pretrained(tmp_path)(ids, attention_mask=mask).text_embeds
        image_embeds = CLIPVisionModelWithProjection.from_pretrained(tmp_path)(pixels).image_embeds
        assert_close(text_embeds, clip.text_projection(clip.text_model(ids, attention_mask=mask).pooler_output))
        assert_close(image_embeds, clip.visual_projection(clip.vision_model(pixels).pooler_output))


def test_vision_config_from_the_safety_checkers_full_clip_config(tmp_path: Path) -> None:
    sd15_tiny = pytest.importorskip("gesso_sd15.tiny")
    sd15_tiny.tiny_safety_checker_config().save_pretrained(tmp_path)
    ours = CLIPVisionConfig.from_pretrained(tmp_path)
    theirs = transformers.CLIPVisionConfig.from_pretrained(tmp_path)
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
        "projection_dim",
    ):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert CLIPTextConfig.from_pretrained(tmp_path).hidden_size == transformers.CLIPTextConfig.from_pretrained(tmp_path).hidden_size


def test_nested_projection_dim_falls_back_to_the_top_level_one() -> None:
    """A full config whose tower section omits projection_dim: the checkpoint's projection is the top-level size."""
    data = {"model_type": "clip", "projection_dim": 16, "vision_config": {"hidden_size": 32, "num_attention_heads": 4}}
    assert CLIPVisionConfig.from_dict(data).projection_dim == 16
    assert CLIPVisionConfig.from_dict({**data, "vision_config": {**data["vision_config"], "projection_dim": 8}}).projection_dim == 8


# --- saving ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours_cls", "theirs_cls"),
    [
        (CLIPTextModel, transformers.CLIPTextModel),
        (CLIPTextModelWithProjection, transformers.CLIPTextModelWithProjection),
        (CLIPVisionModel, transformers.CLIPVisionModel),
        (CLIPVisionModelWithProjection, transformers.CLIPVisionModelWithProjection),
    ],
)
def test_saved_files_load_in_transformers_and_gesso(tmp_path: Path, ours_cls: type, theirs_cls: type) -> None:
    is_text = "Text" in ours_cls.__name__
    fields = (CLIPTextConfig if is_text else CLIPVisionConfig)().to_dict()
    config = {k: v for k, v in (text_config("legacy") if is_text else vision_config()).to_dict().items() if k in fields}
    config["use_attention_mask"] = True  # a key the config classes do not know must survive the save
    torch.manual_seed(4)
    original = ours_cls(config).eval()
    randomise(original, 4)
    original.save_pretrained(tmp_path / "single")
    original.save_pretrained(tmp_path / "sharded", max_shard_size=20_000)
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1

    saved = json.loads((tmp_path / "single" / "config.json").read_text())
    assert saved["architectures"] == [ours_cls.__name__]
    assert saved["model_type"] == ("clip_text_model" if is_text else "clip_vision_model")
    assert all(
        key.startswith(("text_model.", "vision_model.", "text_projection.", "visual_projection."))
        for key in load_file(tmp_path / "single" / "model.safetensors")
    )

    inputs = prompts(text_config("legacy"))[0] if is_text else torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = original(inputs, output_hidden_states=True)
        for folder in ("single", "sharded"):
            theirs, info = theirs_cls.from_pretrained(tmp_path / folder, output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
            assert_same_outputs(expected, theirs.eval()(inputs, output_hidden_states=True))
            again = ours_cls.from_pretrained(tmp_path / folder)
            assert again.config == original.config
            assert again.config.use_attention_mask is True
            assert_same_outputs(again(inputs, output_hidden_states=True), theirs(inputs, output_hidden_states=True))


# --- loading rules ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("text")
    reference(transformers.CLIPTextModel, text_config("last", layers=2), seed=5).save_pretrained(folder)
    prefixed_classic_file(folder, "text_model")
    return folder


def test_dtype_casts_floating_weights(text_folder: Path) -> None:
    assert CLIPTextModel.from_pretrained(text_folder).dtype == torch.float32
    for dtype in (torch.float16, "float16"):
        model = CLIPTextModel.from_pretrained(text_folder, dtype=dtype)
        assert model.dtype == torch.float16 and all(p.dtype == torch.float16 for p in model.parameters())
    assert CLIPTextModel.from_pretrained(text_folder, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert not CLIPTextModel.from_pretrained(text_folder).training


def test_auto_dtype_keeps_the_files(tmp_path: Path) -> None:
    reference(transformers.CLIPTextModel, text_config("last", layers=2)).half().save_pretrained(tmp_path)
    assert CLIPTextModel.from_pretrained(tmp_path, dtype="auto").dtype == torch.float16


def rewrite(folder: Path, tmp_path: Path, change: Any) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, str(copy / "model.safetensors"))
    return copy


def test_missing_tensor_is_named(text_folder: Path, tmp_path: Path) -> None:
    folder = rewrite(text_folder, tmp_path, lambda state: state.pop("text_model.final_layer_norm.bias"))
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor 'text_model\.final_layer_norm\.bias' is missing"):
        CLIPTextModel.from_pretrained(folder)


def test_wrong_shape_is_named(text_folder: Path, tmp_path: Path) -> None:
    def shrink(state: dict[str, torch.Tensor]) -> None:
        state["text_model.encoder.layers.1.mlp.fc1.weight"] = state["text_model.encoder.layers.1.mlp.fc1.weight"][:-1]

    folder = rewrite(text_folder, tmp_path, shrink)
    with pytest.raises(WeightsError, match=r"tensor 'text_model\.encoder\.layers\.1\.mlp\.fc1\.weight' has shape \(63, 32\)"):
        CLIPTextModel.from_pretrained(folder)


def test_unknown_tensor_is_refused_but_stale_position_ids_are_not(text_folder: Path, tmp_path: Path) -> None:
    assert "text_model.embeddings.position_ids" in load_file(text_folder / "model.safetensors")
    CLIPTextModel.from_pretrained(text_folder)  # the stale buffer is ignored
    folder = rewrite(text_folder, tmp_path, lambda state: state.update({"text_model.extra.weight": torch.zeros(2)}))
    with pytest.raises(WeightsError, match=r"unexpected tensor 'text_model\.extra\.weight'"):
        CLIPTextModel.from_pretrained(folder)


# --- the module's surface --------------------------------------------------------------------------


def assert_same_entries(ours: tuple[Any, ...], theirs: tuple[Any, ...]) -> None:
    assert len(ours) == len(theirs)
    for mine, other in zip(ours, theirs):
        if torch.is_tensor(other):
            assert_close(mine, other)
        else:  # the hidden states
            assert_same_entries(mine, other)


def test_outputs_index_like_transformers(text_folder: Path) -> None:
    """Positions count only the fields that are set, in both the output object and return_dict=False."""
    ours = CLIPTextModel.from_pretrained(text_folder)
    theirs = transformers.CLIPTextModel.from_pretrained(text_folder).eval()
    ids, _ = prompts(text_config("last"))
    with torch.no_grad():
        for hidden in (False, True):
            mine, other = ours(ids, output_hidden_states=hidden), theirs(ids, output_hidden_states=hidden)
            assert_same_entries(tuple(mine[i] for i in range(len(mine))), other.to_tuple())
            assert_same_entries(mine.to_tuple(), other.to_tuple())
            assert_same_entries(
                ours(ids, output_hidden_states=hidden, return_dict=False), theirs(ids, output_hidden_states=hidden, return_dict=False)
            )
            assert ("hidden_states" in mine) is hidden and (mine.hidden_states is None) is not hidden
            assert_close(mine["pooler_output"], other["pooler_output"])


def test_final_layer_norm_is_reachable_the_way_pipelines_reach_it(text_folder: Path) -> None:
    """SD pipelines apply the final norm to a chosen hidden state (clip skip)."""
    model = CLIPTextModel.from_pretrained(text_folder)
    ids, _ = prompts(text_config("last"))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        assert_close(final_layer_norm(model)(out.hidden_states[-1]), out.last_hidden_state)


def test_config_surface(text_folder: Path) -> None:
    config = CLIPTextModel.from_pretrained(text_folder).config
    expected = transformers.CLIPTextConfig.from_pretrained(text_folder)
    assert (config.hidden_size, config.projection_dim, config.eos_token_id) == (
        expected.hidden_size,
        expected.projection_dim,
        expected.eos_token_id,
    )
    assert getattr(config, "use_attention_mask", False) is False
    assert config.to_dict()["model_type"] == "clip_text_model"
    for ours, theirs in ((CLIPTextConfig(), transformers.CLIPTextConfig()), (CLIPVisionConfig(), transformers.CLIPVisionConfig())):
        assert {k: getattr(theirs, k) for k in ours.to_dict()} == ours.to_dict()  # transformers' defaults


def test_forward_follows_the_callers_grad_mode(text_folder: Path) -> None:
    model = CLIPTextModel.from_pretrained(text_folder)
    ids, _ = prompts(text_config("last"))
    assert model(ids).pooler_output.requires_grad
    with torch.no_grad():
        assert not model(ids).pooler_output.requires_grad


def test_importing_the_models_does_not_import_transformers() -> None:
    code = "import sys, gesso.clip.models; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_loading_imports_neither_transformers_nor_the_compiler(tmp_path: Path) -> None:
    """Models are built on the meta device; initialising embeddings there would import torch._dynamo and sympy (seconds)."""
    torch.manual_seed(0)
    CLIPTextModel(text_config("last", layers=1).to_dict()).save_pretrained(tmp_path / "text")
    CLIPVisionModelWithProjection(vision_config().to_dict()).save_pretrained(tmp_path / "vision")
    code = (
        "import sys; from gesso.clip import CLIPTextModel, CLIPVisionModelWithProjection; "
        f"CLIPTextModel.from_pretrained({str(tmp_path / 'text')!r}); CLIPVisionModelWithProjection.from_pretrained({str(tmp_path / 'vision')!r}); "
        "print([m for m in ('transformers', 'torch._dynamo', 'sympy') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "[]", done.stderr[-2000:] or done.stdout


def test_random_initialisation_off_the_meta_device() -> None:
    """Built on a real device, the embeddings are initialised as ``nn.Embedding`` initialises them."""
    model = CLIPVisionModel(vision_config().to_dict())
    embeddings = model.vision_model.embeddings
    for weight in (embeddings.position_embedding.weight, embeddings.class_embedding):
        assert isinstance(weight, torch.nn.Parameter) and weight.requires_grad and torch.isfinite(weight).all()
        assert 0.8 < weight.std().item() < 1.2
