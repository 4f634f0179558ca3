"""The Stable Diffusion safety checker: CLIP image embeddings scored against concept embeddings.

Config and weights are the published ``safety_checker`` folder's: ``config.json`` is a full
transformers ``CLIPConfig`` (the checker uses its vision tower and top-level ``projection_dim``), and
the tensors are ``vision_model.vision_model.*`` (the tower), ``visual_projection.weight``, the concept
embeddings and their thresholds. The checker is built on gesso's CLIP vision tower, so loading it
imports no transformers; the reference's class loads the files it saves, and the other way round.

Scores are rounded to three decimals before the threshold test, as the published checker does, so
borderline images are flagged identically.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from gesso.clip.models import CLIPPreTrainedModel, CLIPVisionConfig, CLIPVisionModel

logger = logging.getLogger("gesso")

#: ``config.json`` keys that describe the file rather than the model; ``save_pretrained`` writes them afresh.
_FILE_KEYS = frozenset({"model_type", "architectures", "dtype", "torch_dtype", "_name_or_path"})
#: transformers' ``CLIPConfig`` default, for a config without ``projection_dim``.
_DEFAULT_PROJECTION_DIM = 512


class SafetyCheckerConfig:
    """The checker's ``config.json``, a full ``CLIPConfig``: every key is kept and written back.

    ``vision_config`` is the vision tower's settings (``vision_config`` section, transformers'
    defaults for what it omits); ``projection_dim`` the width of the image embeddings compared with
    the concepts (the top-level key, not the tower's own ``projection_dim``).
    """

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = {key: value for key, value in data.items() if key not in _FILE_KEYS}
        self.vision_config = CLIPVisionConfig.from_dict({**self._data, "model_type": "clip"})
        self.projection_dim = int(self._data.get("projection_dim", _DEFAULT_PROJECTION_DIM))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SafetyCheckerConfig:
        return cls(data)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "clip", **self._data}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SafetyCheckerConfig) and other.to_dict() == self.to_dict()

    def __repr__(self) -> str:
        return f"SafetyCheckerConfig {json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)}"


def _cosine(embeds: torch.Tensor, concepts: torch.Tensor) -> np.ndarray:
    a = torch.nn.functional.normalize(embeds)
    b = torch.nn.functional.normalize(concepts)
    return (a @ b.T).cpu().float().numpy()


class StableDiffusionSafetyChecker(CLIPPreTrainedModel):
    """``from_pretrained(folder, torch_dtype=..., variant=..., use_safetensors=..., device_map=...)``
    and ``save_pretrained`` as gesso's CLIP models; ``forward(clip_input, images)`` as the reference's."""

    config_class = SafetyCheckerConfig
    tower = "vision_model"
    #: The pipeline folder the reference keeps the class in; it loads ``["stable_diffusion", ...]``.
    model_index_library = "stable_diffusion"

    def __init__(self, config: SafetyCheckerConfig | Mapping[str, Any] | Any) -> None:
        """``config``: a :class:`SafetyCheckerConfig`, the ``config.json`` mapping, or a transformers ``CLIPConfig``."""
        super().__init__(config)
        vision, width = self.config.vision_config, self.config.projection_dim
        self.vision_model = CLIPVisionModel(vision)
        self.visual_projection = torch.nn.Linear(vision.hidden_size, width, bias=False)
        frozen = {"requires_grad": False}
        self.concept_embeds = torch.nn.Parameter(torch.ones(17, width), **frozen)
        self.special_care_embeds = torch.nn.Parameter(torch.ones(3, width), **frozen)
        self.concept_embeds_weights = torch.nn.Parameter(torch.ones(17), **frozen)
        self.special_care_embeds_weights = torch.nn.Parameter(torch.ones(3), **frozen)

    def _own_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A file's tensors under this model's names.

        Published files (and transformers 4) hold the tower as ``vision_model.vision_model.*``;
        transformers 5 writes it as ``vision_model.*``, without the inner prefix, which is put back.
        Stale ``position_ids`` buffers of older files are dropped.
        """
        inner = f"{self.tower}.{self.tower}."
        own: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            if key.endswith(".position_ids"):
                continue
            if key.startswith(f"{self.tower}.") and not key.startswith(inner):
                key = f"{self.tower}.{key}"
            own[key] = tensor
        return own

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
