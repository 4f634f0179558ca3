"""Full-size checkpoints with random weights, from the real published configs (no download).

``tests/data/full-size-architectures.json`` holds the configs of the published components. Each
family's folder is written in the real on-disk layout by gesso's own models and transformers, so
both gesso and the reference load it through their normal loading paths.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = Path(__file__).resolve().parents[1] / "tests" / "data" / "full-size-architectures.json"


def architectures() -> dict[str, Any]:
    return json.loads(ARCHITECTURES.read_text())


def _clean(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@torch.no_grad()
def fill_random(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Small seeded weights (norm scales near 1) so activations stay finite in float16."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    for name, param in module.named_parameters():
        if param.ndim == 1 and ("norm" in name or name.endswith("weight")):
            param.fill_(1.0) if name.endswith("weight") else param.zero_()
        else:
            param.normal_(0.0, std, generator=generator)


@torch.no_grad()
def calibrate_unet(unet: torch.nn.Module, spec: dict[str, Any]) -> None:
    """Scale the output convolution so the noise prediction has unit spread, as a trained one does;
    random weights otherwise predict values tens of times too large, and the sampler amplifies them."""
    device = next(unet.parameters()).device
    size = spec["unet"]["sample_size"] // 2
    generator = torch.Generator(device=device).manual_seed(0)
    sample = torch.randn(1, 4, size, size, device=device, generator=generator)
    hidden = torch.randn(1, 77, spec["unet"]["cross_attention_dim"], device=device, generator=generator)
    added = None
    if spec["unet"].get("addition_embed_type") == "image":  # Kandinsky: an image embedding, no text tokens
        hidden, added = None, {"image_embeds": torch.randn(1, spec["unet"]["encoder_hid_dim"], device=device, generator=generator)}
    if spec["unet"].get("addition_embed_type") == "text_time":
        text = spec["unet"]["projection_class_embeddings_input_dim"] - 6 * spec["unet"]["addition_time_embed_dim"]
        added = {
            "text_embeds": torch.randn(1, text, device=device, generator=generator),
            "time_ids": torch.full((1, 6), 512.0, device=device),
        }
    spread = unet(sample, torch.tensor(500.0, device=device), hidden, added_cond_kwargs=added).sample.std()
    unet.conv_out.weight.div_(spread)
    unet.conv_out.bias.div_(spread)


def _text_encoder(config: dict[str, Any], projection: bool, device: str) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    keys = (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_hidden_layers",
        "max_position_embeddings",
        "vocab_size",
        "hidden_act",
        "projection_dim",
    )
    text_config = CLIPTextConfig(**{k: config[k] for k in keys if k in config})
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    with torch.device(device):
        return cls(text_config)


def write_family(family: str, folder: Path, device: str = "cuda", dtype: torch.dtype = torch.float16) -> Path:
    """Write a full-size ``sd15`` or ``sdxl`` checkpoint folder (``variant`` files not used)."""
    from gesso.nn import AutoencoderKL, UNet2DConditionModel
    from gesso.schedulers import EulerDiscreteScheduler, PNDMScheduler
    from gesso.tiny import write_clip_tokenizer, write_model_index

    spec = architectures()[family]
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(_clean(spec["unet"]))
        vae = AutoencoderKL.from_config(_clean(spec["vae"]))
    modules: dict[str, torch.nn.Module] = {"unet": unet, "vae": vae, "text_encoder": _text_encoder(spec["text_encoder"], False, device)}
    components: dict[str, tuple[str | None, str | None]] = {
        "unet": ("diffusers", "UNet2DConditionModel"),
        "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "scheduler": ("diffusers", spec["scheduler"]["_class_name"]),
    }
    if "text_encoder_2" in spec:
        modules["text_encoder_2"] = _text_encoder(spec["text_encoder_2"], True, device)
        components["text_encoder_2"] = ("transformers", "CLIPTextModelWithProjection")
        components["tokenizer_2"] = ("transformers", "CLIPTokenizer")
        write_clip_tokenizer(folder / "tokenizer_2")
    for index, module in enumerate(modules.values()):
        fill_random(module, seed=index)
    calibrate_unet(unet, spec)
    for name, module in modules.items():
        module.to(dtype).save_pretrained(folder / name)
    write_clip_tokenizer(folder / "tokenizer")
    scheduler_cls = {"PNDMScheduler": PNDMScheduler, "EulerDiscreteScheduler": EulerDiscreteScheduler}[spec["scheduler"]["_class_name"]]
    scheduler_cls.from_config(_clean(spec["scheduler"])).save_pretrained(folder / "scheduler")
    pipeline_class = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
    write_model_index(folder, pipeline_class, {**components, "safety_checker": (None, None), "feature_extractor": (None, None)})
    if family == "sdxl":
        index = json.loads((folder / "model_index.json").read_text())
        index.update({"force_zeros_for_empty_prompt": True, "image_encoder": [None, None], "feature_extractor": [None, None]})
        index.pop("safety_checker", None)
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    del modules
    torch.cuda.empty_cache() if device == "cuda" else None
    return folder


def write_kandinsky(folder: Path, device: str = "cuda", dtype: torch.dtype = torch.float16) -> Path:
    """Write a full-size Kandinsky 2.2 combined checkpoint (decoder + ``prior_*`` components), the
    layout ``AutoPipelineForText2Image`` loads as ``KandinskyV22CombinedPipeline`` in both libraries."""
    import gesso_kandinsky.unet  # noqa: F401 - registers the UNet's blocks
    from gesso.nn import UNet2DConditionModel
    from gesso.schedulers import DDPMScheduler, UnCLIPScheduler
    from gesso.tiny import write_clip_tokenizer, write_model_index
    from gesso_kandinsky.movq import VQModel
    from gesso_kandinsky.prior_transformer import PriorTransformer
    from gesso_kandinsky.tiny import DECODER_INDEX, PRIOR_INDEX
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    spec = architectures()["kandinsky22"]
    vision = spec["prior_image_encoder"]
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device(device):
        modules: dict[str, torch.nn.Module] = {
            "unet": UNet2DConditionModel.from_config(_clean(spec["unet"])),
            "movq": VQModel(**_clean(spec["movq"])),
            "prior_prior": PriorTransformer(**_clean(spec["prior"])),
            "prior_image_encoder": CLIPVisionModelWithProjection(
                CLIPVisionConfig(**{k: v for k, v in vision.items() if k != "architectures"})
            ),
        }
    modules["prior_text_encoder"] = _text_encoder(spec["prior_text_encoder"], True, device)
    for index, module in enumerate(modules.values()):
        fill_random(module, seed=index)
    calibrate_unet(modules["unet"], spec)
    for name, module in modules.items():
        module.to(dtype).save_pretrained(folder / name)
    write_clip_tokenizer(folder / "prior_tokenizer")
    DDPMScheduler.from_config(_clean(spec["scheduler"])).save_pretrained(folder / "scheduler")
    UnCLIPScheduler.from_config(_clean(spec["prior_scheduler"])).save_pretrained(folder / "prior_scheduler")
    size = vision["image_size"]
    CLIPImageProcessor(crop_size=size, size=size).save_pretrained(folder / "prior_image_processor")
    write_model_index(folder, "KandinskyV22CombinedPipeline", {**DECODER_INDEX, **{f"prior_{k}": v for k, v in PRIOR_INDEX.items()}})
    del modules
    torch.cuda.empty_cache() if device == "cuda" else None
    return folder


def existing_or_written(name: str, folder: Path) -> Path:
    """``folder`` holding the full-size checkpoint ``name`` (``sd15``, ``sdxl`` or ``kandinsky22``),
    written only when it holds none yet: probes run one after another share the writing."""
    if (folder / "model_index.json").exists():
        return folder
    if name == "kandinsky22":
        return write_kandinsky(folder)
    return write_family(name, folder)
