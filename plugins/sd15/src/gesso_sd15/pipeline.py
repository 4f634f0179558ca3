"""The Stable Diffusion 1.x pipeline: one CLIP text encoder on the core loop, and the safety checker."""

from __future__ import annotations

from typing import Any

import torch
from gesso.images import numpy_to_pil, postprocess, to_numpy
from gesso.pipeline import Conditioning, Text2ImagePipeline
from gesso.text_encoding import attention_mask_for, final_layer_norm, negative_prompts, prompt_batch, repeat_per_image, tokenize


class StableDiffusionPipeline(Text2ImagePipeline):
    family = "sd15"
    expected_components = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
    optional_components = ("safety_checker", "feature_extractor", "image_encoder")

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings for the prompts (and the negative ones when guiding), one row per image."""
        batch_size = prompt_batch(prompt, prompt_embeds)
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self._embed(prompts, device, clip_skip)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = repeat_per_image(prompt_embeds.to(dtype=dtype, device=device), num_images_per_prompt)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negatives = negative_prompts(prompt, negative_prompt, batch_size)
            negative_prompt_embeds = self._embed(negatives, device, None, max_length=prompt_embeds.shape[1])
        if do_classifier_free_guidance:
            negative_prompt_embeds = repeat_per_image(negative_prompt_embeds.to(dtype=dtype, device=device), num_images_per_prompt)
        return prompt_embeds, negative_prompt_embeds

    def _embed(self, prompts: list[str], device: torch.device, clip_skip: int | None, max_length: int | None = None) -> torch.Tensor:
        if max_length is None:
            ids = tokenize(self.tokenizer, prompts)
        else:  # negative prompts: padded to the positive embeddings' length, never warned about
            ids = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
        mask = attention_mask_for(self.text_encoder, self.tokenizer, prompts, device)
        if clip_skip is None:
            return self.text_encoder(ids.to(device), attention_mask=mask)[0]
        hidden = self.text_encoder(ids.to(device), attention_mask=mask, output_hidden_states=True).hidden_states
        return final_layer_norm(self.text_encoder)(hidden[-(clip_skip + 1)])

    def encode(self, call: Any, device: torch.device) -> Conditioning:
        positive, negative = self.encode_prompt(
            call.prompt,
            device,
            call.num_images_per_prompt,
            call.do_classifier_free_guidance,
            call.negative_prompt,
            call.prompt_embeds,
            call.negative_prompt_embeds,
            call.clip_skip,
        )
        hidden = torch.cat([negative, positive]) if call.do_classifier_free_guidance else positive
        return Conditioning(encoder_hidden_states=hidden, prompt_embeds=positive, negative_prompt_embeds=negative)

    def check_safety(self, images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, list[bool] | None]:
        if self.safety_checker is None or self.feature_extractor is None:
            return images, None
        pil_images = numpy_to_pil(to_numpy(postprocess(images, "pt")))
        clip_input = self.feature_extractor(pil_images, return_tensors="pt").pixel_values.to(device=device, dtype=dtype)
        return self.safety_checker(images=images, clip_input=clip_input)
