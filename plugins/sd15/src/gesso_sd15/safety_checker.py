"""The Stable Diffusion safety checker: CLIP image embeddings scored against concept embeddings.

Weights and config are the published ``safety_checker`` folder's (a transformers ``CLIPConfig``).
Scores are rounded to three decimals before the threshold test, as the published checker does, so
borderline images are flagged identically.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from transformers import CLIPConfig, CLIPVisionModel, PreTrainedModel

logger = logging.getLogger("gesso")


def _cosine(embeds: torch.Tensor, concepts: torch.Tensor) -> np.ndarray:
    a = torch.nn.functional.normalize(embeds)
    b = torch.nn.functional.normalize(concepts)
    return (a @ b.T).cpu().float().numpy()


class StableDiffusionSafetyChecker(PreTrainedModel):
    config_class = CLIPConfig
    main_input_name = "clip_input"
    _no_split_modules = ["CLIPEncoderLayer"]

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__(config)
        self.vision_model = CLIPVisionModel(config.vision_config)
        self.visual_projection = torch.nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        frozen = {"requires_grad": False}
        self.concept_embeds = torch.nn.Parameter(torch.ones(17, config.projection_dim), **frozen)
        self.special_care_embeds = torch.nn.Parameter(torch.ones(3, config.projection_dim), **frozen)
        self.concept_embeds_weights = torch.nn.Parameter(torch.ones(17), **frozen)
        self.special_care_embeds_weights = torch.nn.Parameter(torch.ones(3), **frozen)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Weights always come from the checkpoint; nothing to initialise."""

    def flagged(self, clip_input: torch.Tensor) -> list[bool]:
        """Which images show a concept; special-care concepts lower every later threshold by 0.01."""
        image_embeds = self.visual_projection(self.vision_model(clip_input)[1])
        special = _cosine(image_embeds, self.special_care_embeds)
        concepts = _cosine(image_embeds, self.concept_embeds)
        special_thresholds = self.special_care_embeds_weights.float().cpu().numpy()
        concept_thresholds = self.concept_embeds_weights.float().cpu().numpy()
        flags = []
        for i in range(image_embeds.shape[0]):
            adjustment = np.float32(0.0)
            for j in range(special.shape[1]):
                if np.round(special[i, j] - special_thresholds[j] + adjustment, 3) > 0:
                    adjustment = np.float32(0.01)
            flags.append(bool(np.any(np.round(concepts[i] - concept_thresholds + adjustment, 3) > 0)))
        return flags

    @torch.no_grad()
    def forward(self, clip_input: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        flags = self.flagged(clip_input)
        for index, flag in enumerate(flags):
            if flag:
                images[index] = torch.zeros_like(images[index]) if torch.is_tensor(images) else np.zeros(images[index].shape)
        if any(flags):
            logger.warning(
                "Potential NSFW content was detected in one or more images. A black image will be returned instead. Try again with a different prompt and/or seed."
            )
        return images, flags
