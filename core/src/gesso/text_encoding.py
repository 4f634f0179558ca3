"""CLIP prompt encoding shared by the Stable Diffusion families."""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger("gesso")


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length; warns naming the text cut off past it."""
    max_length = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] >= ids.shape[-1] and not torch.equal(ids, full):
        removed = tokenizer.batch_decode(full[:, max_length - 1 : -1])
        logger.warning(
            "The following part of your input was truncated because CLIP can only handle sequences up to %d tokens: %s", max_length, removed
        )
    return ids


def attention_mask_for(text_encoder: Any, tokenizer: Any, prompts: list[str], device: torch.device) -> torch.Tensor | None:
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).attention_mask
        return mask.to(device)
    return None


def prompt_batch(prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None) -> int:
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    assert prompt_embeds is not None
    return prompt_embeds.shape[0]


def negative_prompts(prompt: Any, negative_prompt: Any, batch_size: int) -> list[str]:
    """The reference's rules for the unconditional prompts (and its exception types)."""
    if negative_prompt is None:
        return [""] * batch_size
    if prompt is not None and type(prompt) is not type(negative_prompt):
        raise TypeError(f"`negative_prompt` should be the same type to `prompt`, but got {type(negative_prompt)} != {type(prompt)}.")
    if isinstance(negative_prompt, str):
        return [negative_prompt]
    if batch_size != len(negative_prompt):
        raise ValueError(
            f"`negative_prompt`: {negative_prompt} has batch size {len(negative_prompt)}, but `prompt`: {prompt} "
            f"has batch size {batch_size}. Please make sure that passed `negative_prompt` matches the batch size of `prompt`."
        )
    return list(negative_prompt)


def repeat_per_image(embeds: torch.Tensor, num_images_per_prompt: int) -> torch.Tensor:
    """(B, ...) -> (B * n, ...), each prompt's rows adjacent, as the reference orders them."""
    if embeds.ndim == 2:
        return embeds.repeat(1, num_images_per_prompt).view(embeds.shape[0] * num_images_per_prompt, -1)
    batch, seq, _ = embeds.shape
    return embeds.repeat(1, num_images_per_prompt, 1).view(batch * num_images_per_prompt, seq, -1)


def final_layer_norm(text_encoder: Any) -> torch.nn.Module:
    """The CLIP text encoder's last layer norm (transformers 5 dropped the ``text_model`` wrapper)."""
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm
