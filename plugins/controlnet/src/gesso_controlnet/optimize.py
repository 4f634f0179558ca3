"""``control_embedding_once``: each ControlNet embeds its control image once an image.

A ControlNet turns its control image into a feature map at latent resolution at every step (eight
convolutions, the first ones at full image resolution with 16 channels), although the image is the
same at every step of an image. This optimization wraps the hot-loop module that holds the nets (a
``ControlNetModel`` or a ``MultiControlNetModel``): before a call it embeds the image of each net
into that net's ``control_embedding`` buffer, which the net then adds instead of embedding, and it
embeds again only when an image or the embedding's weights are not those of the last call
(``gesso.optimize.once`` says how that is decided without waiting for the GPU). The same values as
embedding at every step: the same kernels on the same inputs, done earlier.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from gesso.optimize import hot_loop_modules
from gesso.optimize.once import OncePerInput, argument_position, wraps_already

from gesso_controlnet.model import ControlNetModel, MultiControlNetModel

logger = logging.getLogger("gesso")

IMAGE_ARGUMENT = "controlnet_cond"


class ControlEmbeddingOnce(OncePerInput):
    """``forward`` of a ControlNet (or several), with each net's control image embedded beforehand."""

    def __init__(self, module: ControlNetModel | MultiControlNetModel) -> None:
        self.nets: list[ControlNetModel] = list(module.nets) if isinstance(module, MultiControlNetModel) else [module]
        super().__init__(
            module.forward, IMAGE_ARGUMENT, argument_position(module, IMAGE_ARGUMENT), self._embed, self._install, self._weights
        )

    @property
    def embeddings(self) -> int:
        """Times the images were embedded."""
        return self.computations

    def inputs(self, value: Any) -> list[torch.Tensor] | None:
        """One image, or a MultiControlNet's sequence of images (one a net)."""
        if isinstance(value, Sequence) and value and all(isinstance(image, torch.Tensor) for image in value):
            return list(value)
        return super().inputs(value)

    def _embed(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [net.embed_control(image) for net, image in zip(self.nets, images, strict=True)]

    def _install(self, buffers: list[torch.Tensor] | None) -> None:
        for index, net in enumerate(self.nets):
            net.control_embedding = None if buffers is None else buffers[index]

    def _weights(self) -> list[torch.Tensor]:
        return [p for net in self.nets for p in net.controlnet_cond_embedding.parameters()]


def control_embedding_once(pipeline: Any, policy: Any) -> None:
    """Embed each ControlNet's control image once an image, not at every step."""
    wrapped = False
    for module in hot_loop_modules(pipeline, policy).values():
        if isinstance(module, ControlNetModel | MultiControlNetModel) and not wraps_already(module, ControlEmbeddingOnce):
            module.forward = ControlEmbeddingOnce(module)
            wrapped = True
    if not wrapped:
        logger.info("control_embedding_once: no ControlNet among the hot-loop modules; nothing changed")
