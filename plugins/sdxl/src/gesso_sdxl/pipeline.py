"""The Stable Diffusion XL pipeline on the core loop.

What SDXL adds to the generic loop:

- two CLIP text encoders: the penultimate hidden states of both, joined along the feature axis,
  condition cross-attention; the second encoder's projected (pooled) embedding goes to the UNet's
  added embedding;
- micro-conditioning: six "time ids" (original size, crop top-left, target size) per image, with
  separate ones for the unconditional half when ``negative_*`` sizes are given;
- ``force_zeros_for_empty_prompt`` (a pipeline setting stored in ``model_index.json``): without a
  negative prompt the unconditional embeddings are zeros rather than the encoding of "";
- ``denoising_end``: stop early and hand the latents to a refiner;
- float32 decoding when the VAE's config has ``force_upcast`` and the VAE is float16 (SDXL's VAE
  overflows in float16); a decoded NaN is an error, never a black image.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from gesso.loading import read_model_index
from gesso.pipeline import Conditioning, PipelineOutput, Text2ImagePipeline
from gesso.text_encoding import negative_prompts, prompt_batch, repeat_per_image, tokenize

from gesso_sdxl.plugin import CONFIG_KEYS


class StableDiffusionXLPipeline(Text2ImagePipeline):
    family = "sdxl"
    expected_components = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
    optional_components = ("image_encoder", "feature_extractor")

    default_num_inference_steps: ClassVar[int] = 50
    default_guidance_scale: ClassVar[float] = 5.0
    extra_call_parameters: ClassVar[dict[str, Any]] = {
        **{key: default for key, default in CONFIG_KEYS.items() if key != "guidance_rescale"},  # the core call takes that one
        "pooled_prompt_embeds": None,
        "negative_pooled_prompt_embeds": None,
    }
    callback_tensor_inputs: ClassVar[tuple[str, ...]] = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")
    callback_added_cond_names: ClassVar[dict[str, str]] = {"text_embeds": "add_text_embeds", "time_ids": "add_time_ids"}

    def __init__(self, force_zeros_for_empty_prompt: bool = True, add_watermarker: bool | None = None, **components: Any) -> None:
        if add_watermarker:
            raise ValueError("gesso does not apply the invisible watermark; leave add_watermarker out or pass add_watermarker=False")
        super().__init__(**components)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

    @property
    def config(self) -> SimpleNamespace:
        """The pipeline's own settings, as ``model_index.json`` stores them."""
        return SimpleNamespace(force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)

    # -- loading and saving: ``force_zeros_for_empty_prompt`` lives in model_index.json -----------
    @classmethod
    def from_folder(cls, folder: Path, **kwargs: Any) -> StableDiffusionXLPipeline:
        setting = kwargs.pop("force_zeros_for_empty_prompt", None)
        watermark = kwargs.pop("add_watermarker", None)
        if watermark:
            raise ValueError("gesso does not apply the invisible watermark; leave add_watermarker out or pass add_watermarker=False")
        pipeline = super().from_folder(folder, **kwargs)
        if setting is None:
            setting = read_model_index(Path(folder)).get("force_zeros_for_empty_prompt", True)
        pipeline.force_zeros_for_empty_prompt = bool(setting)
        return pipeline

    def save_pretrained(self, save_directory: str | Path, variant: str | None = None) -> None:
        super().save_pretrained(save_directory, variant=variant)
        path = Path(save_directory) / "model_index.json"
        index = json.loads(path.read_text(encoding="utf-8"))
        index["force_zeros_for_empty_prompt"] = self.force_zeros_for_empty_prompt
        path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    # -- text encoding ---------------------------------------------------------------------------
    def _encoders(self) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs in use; a checkpoint may ship only the second encoder."""
        if self.text_encoder is None or self.tokenizer is None:
            return [(self.tokenizer_2, self.text_encoder_2)]
        return [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]

    def _embed(
        self,
        texts: list[list[str]],
        device: torch.device,
        layer: int,
        pooled: torch.Tensor | None,
        max_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states of ``layer`` (counted from the end) of each encoder, joined; and the pooled
        embedding: the first encoder output that is one vector per prompt, unless one was given."""
        states = []
        for prompts, (tokenizer, encoder) in zip(texts, self._encoders()):
            if max_length is None:
                ids = tokenize(tokenizer, prompts)
            else:  # unconditional prompts: padded to the positive embeddings' length, never warned about
                ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
            output = encoder(ids.to(device), output_hidden_states=True)
            if pooled is None and output[0].ndim == 2:
                pooled = output[0]
            states.append(output.hidden_states[layer])
        return torch.cat(states, dim=-1), pooled

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        prompt_2: str | list[str] | None = None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds),
        one row per image. ``prompt_2`` / ``negative_prompt_2`` go to the second encoder (default: the
        first prompts). ``clip_skip=k`` takes the hidden states k layers before the penultimate one."""
        device = device or self.device
        prompts = [prompt] if isinstance(prompt, str) else prompt
        batch_size = prompt_batch(prompts, prompt_embeds)
        if prompt_embeds is None:
            second = prompt_2 or prompts
            second = [second] if isinstance(second, str) else second
            layer = -2 if clip_skip is None else -(clip_skip + 2)
            prompt_embeds, pooled_prompt_embeds = self._embed([prompts, second], device, layer, pooled_prompt_embeds)

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            if negative_prompt is None and self.force_zeros_for_empty_prompt:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
                negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
            else:
                negative = negative_prompt or ""
                negative_2 = negative_prompt_2 or negative
                negative = negative_prompts(prompts, [negative] * batch_size if isinstance(negative, str) else negative, batch_size)
                negative_2 = [negative_2] * batch_size if isinstance(negative_2, str) else negative_2
                negative_prompt_embeds, negative_pooled_prompt_embeds = self._embed(
                    [negative, negative_2], device, -2, negative_pooled_prompt_embeds, max_length=prompt_embeds.shape[1]
                )

        dtype = self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.unet.dtype
        prompt_embeds = repeat_per_image(prompt_embeds.to(dtype=dtype, device=device), num_images_per_prompt)
        pooled_prompt_embeds = repeat_per_image(pooled_prompt_embeds.to(device), num_images_per_prompt)
        if do_classifier_free_guidance:
            negative_prompt_embeds = repeat_per_image(negative_prompt_embeds.to(dtype=dtype, device=device), num_images_per_prompt)
            negative_pooled_prompt_embeds = repeat_per_image(negative_pooled_prompt_embeds.to(device), num_images_per_prompt)
        return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    # -- micro-conditioning ----------------------------------------------------------------------
    def add_time_ids(
        self, original_size: Any, crops_coords_top_left: Any, target_size: Any, dtype: torch.dtype, projection_dim: int
    ) -> torch.Tensor:
        """The (1, 6) time ids; refuses a UNet whose added embedding expects another width."""
        values = [*original_size, *crops_coords_top_left, *target_size]
        given = self.unet.config.addition_time_embed_dim * len(values) + projection_dim
        expected = self.unet.add_embedding.linear_1.in_features
        if given != expected:
            raise ValueError(
                f"Model expects an added time embedding vector of length {expected}, but a vector of {given} was created. "
                "The model has an incorrect config. Please check `unet.config.time_embedding_type` and `text_encoder_2.config.projection_dim`."
            )
        return torch.tensor([values], dtype=dtype)

    # -- the family's part of the loop -----------------------------------------------------------
    def check_inputs(self, call: Any) -> None:
        super().check_inputs(call)
        if call.prompt_2 is not None and call.prompt_embeds is not None:
            raise ValueError(
                f"Cannot forward both `prompt_2`: {call.prompt_2} and `prompt_embeds`. Please make sure to only forward one of the two."
            )
        if call.prompt_2 is not None and not isinstance(call.prompt_2, str | list):
            raise ValueError(f"`prompt_2` has to be of type `str` or `list` but is {type(call.prompt_2)}")
        if call.negative_prompt_2 is not None and call.negative_prompt_embeds is not None:
            raise ValueError(
                f"Cannot forward both `negative_prompt_2`: {call.negative_prompt_2} and `negative_prompt_embeds`. Please make sure to only forward one of the two."
            )
        if call.prompt_embeds is not None and call.pooled_prompt_embeds is None:
            raise ValueError(
                "If `prompt_embeds` are provided, `pooled_prompt_embeds` also have to be passed. Make sure to generate "
                "`pooled_prompt_embeds` from the same text encoder that was used to generate `prompt_embeds`."
            )
        if call.negative_prompt_embeds is not None and call.negative_pooled_prompt_embeds is None:
            raise ValueError(
                "If `negative_prompt_embeds` are provided, `negative_pooled_prompt_embeds` also have to be passed. Make sure to "
                "generate `negative_pooled_prompt_embeds` from the same text encoder that was used to generate `negative_prompt_embeds`."
            )

    def encode(self, call: Any, device: torch.device) -> Conditioning:
        positive, negative, pooled, negative_pooled = self.encode_prompt(
            call.prompt,
            call.prompt_2,
            device,
            call.num_images_per_prompt,
            call.do_classifier_free_guidance,
            call.negative_prompt,
            call.negative_prompt_2,
            call.prompt_embeds,
            call.negative_prompt_embeds,
            call.pooled_prompt_embeds,
            call.negative_pooled_prompt_embeds,
            call.clip_skip,
        )
        size = (call.height, call.width)
        projection_dim = int(pooled.shape[-1]) if self.text_encoder_2 is None else self.text_encoder_2.config.projection_dim
        time_ids = self.add_time_ids(
            call.original_size or size, call.crops_coords_top_left, call.target_size or size, positive.dtype, projection_dim
        )
        negative_time_ids = time_ids
        if call.negative_original_size is not None and call.negative_target_size is not None:
            negative_time_ids = self.add_time_ids(
                call.negative_original_size, call.negative_crops_coords_top_left, call.negative_target_size, positive.dtype, projection_dim
            )
        hidden, text_embeds = positive, pooled
        if call.do_classifier_free_guidance:
            hidden = torch.cat([negative, positive])
            text_embeds = torch.cat([negative_pooled, pooled])
            time_ids = torch.cat([negative_time_ids, time_ids])
        # The (unconditional, conditional) pair of time ids is tiled over the batch, as the reference does.
        time_ids = time_ids.to(device).repeat(self.batch_size(call) * call.num_images_per_prompt, 1)
        return Conditioning(
            encoder_hidden_states=hidden.to(device),
            added_cond_kwargs={"text_embeds": text_embeds.to(device), "time_ids": time_ids},
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
        )

    def prepare_timesteps(self, call: Any, device: torch.device) -> torch.Tensor:
        """The schedule; with ``denoising_end`` in (0, 1), only the timesteps at or above the cut."""
        timesteps = super().prepare_timesteps(call, device)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        end = call.denoising_end
        if isinstance(end, float) and 0 < end < 1:
            train_steps = self.scheduler.config.num_train_timesteps
            cutoff = int(round(train_steps - end * train_steps))
            timesteps = timesteps[: int((timesteps >= cutoff).sum())]
        return timesteps

    def decode(self, latents: torch.Tensor, call: Any) -> torch.Tensor:
        """Decode, in float32 when a float16 VAE asks for it (``force_upcast``); NaN is an error."""
        vae = self.vae
        upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            latents = latents.to(device=self.device, dtype=vae.dtype)  # the execution device (the VAE may be offloaded)
            mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                channels = latents.shape[1]
                mean = torch.tensor(mean).view(1, channels, 1, 1).to(latents.device, latents.dtype)
                std = torch.tensor(std).view(1, channels, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std / vae.config.scaling_factor + mean
            else:
                latents = latents / vae.config.scaling_factor
            images = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        if torch.isnan(images).any():
            raise ValueError(
                f"the VAE decoded NaN values (VAE dtype {images.dtype}, force_upcast={getattr(vae.config, 'force_upcast', None)}): "
                "the float16 VAE overflowed; use a VAE fixed for float16 (from_pretrained(..., vae=...)) or run the VAE in float32"
            )
        return images

    def _finish(
        self, latents: torch.Tensor, call: Any, device: torch.device, conditioning: Conditioning
    ) -> PipelineOutput | tuple[Any, ...]:
        result = super()._finish(latents, call, device, conditioning)
        return result if call.return_dict else (result[0],)  # the reference returns (images,)
