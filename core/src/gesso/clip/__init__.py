"""CLIP text and vision encoders, tokenizer and image processor of gesso's own.

They read and write the published (transformers) layout, so checkpoints load unchanged, and they
import in a fraction of the time transformers' classes take: a new process reaches its first image
sooner. Pipelines load the ``["transformers", "CLIP..."]`` components of ``model_index.json`` with
them (``gesso.builtin``) and save them under those names again. Names resolve on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CLIPTextConfig": "gesso.clip.models",
    "CLIPVisionConfig": "gesso.clip.models",
    "CLIPTextModel": "gesso.clip.models",
    "CLIPTextModelWithProjection": "gesso.clip.models",
    "CLIPVisionModel": "gesso.clip.models",
    "CLIPVisionModelWithProjection": "gesso.clip.models",
    "CLIPPreTrainedModel": "gesso.clip.models",
    "CLIPTokenizer": "gesso.clip.tokenizer",
    "CLIPImageProcessor": "gesso.clip.image_processor",
}

__all__ = sorted(_EXPORTS)


class Batch(dict):
    """A processor's outputs by key or by attribute (``batch.input_ids``), as the reference returns
    them; the tokenizer's ``BatchEncoding`` and the image processor's ``BatchFeature``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _mapped(self, move: Any) -> Any:
        """A copy with ``move`` applied to every value that has a ``.to`` (tensors; lists stay)."""
        return type(self)({k: move(v) if hasattr(v, "to") else v for k, v in self.items()})


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gesso.clip' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
