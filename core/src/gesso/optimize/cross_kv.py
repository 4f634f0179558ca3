"""The prompt's cross-attention keys and values, computed once per image instead of at every step.

A UNet's cross-attentions project the same text embeddings to keys and values at every denoising
step: SDXL does 70 such matrix products a step (about 0.5 ms of its 31 ms on an H200), each giving
the result of the step before. ``cross_kv_once`` wraps each hot-loop module whose cross-attentions
all attend to its ``encoder_hidden_states`` as given (the module says so through
``cross_attention_context_is_input``): before a call, it projects that context for every
cross-attention into the attention's ``text_key`` / ``text_value`` buffers, which the attention
then reads instead of projecting, and it does so again only when the context or the projection
weights are not those of the last call.

The context counts as the same by its memory and version, the weights by theirs, and the
projections run outside any CUDA graph (``gesso.optimize.once``, which says how and when it
projects at every call instead).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from gesso.optimize import hot_loop_modules
from gesso.optimize.once import OncePerInput, argument_position, wraps_already

logger = logging.getLogger("gesso")

CONTEXT_ARGUMENT = "encoder_hidden_states"


def cross_attentions(module: torch.nn.Module) -> list[Any]:
    """The attentions of ``module`` over its context whose keys and values can be set ahead: those
    of its transformer blocks that attend to the context, and plugin attentions whose class says so
    (``context_kv_ahead = True``, with ``project_context``, ``context_parameters`` and the
    ``text_key`` / ``text_value`` buffers)."""
    from gesso.nn.attention import Attention, BasicTransformerBlock

    found = []
    for block in module.modules():
        if isinstance(block, BasicTransformerBlock):
            candidates = [block.attn2, block.attn1] if block.only_cross_attention else [block.attn2]
            found.extend(a for a in candidates if type(a) is Attention)  # subclasses project their own way
        elif getattr(type(block), "context_kv_ahead", False):
            found.append(block)
    return found


def install_context_kv(attentions: list[Any], buffers: list[torch.Tensor] | None) -> None:
    """Point each attention at its keys and values among ``buffers`` (two each, in order), or
    (``None``) let them project their context during the call again."""
    for index, attention in enumerate(attentions):
        if buffers is None:
            attention.text_key = attention.text_value = None
        else:
            attention.text_key, attention.text_value = buffers[2 * index], buffers[2 * index + 1]


class CrossKVOnce(OncePerInput):
    """``forward`` of one hot-loop module, with its cross-attentions' keys and values set beforehand."""

    def __init__(self, forward: Callable[..., Any], attentions: list[Any], context_position: int | None) -> None:
        self.attentions = attentions
        super().__init__(forward, CONTEXT_ARGUMENT, context_position, self._project, self._install, self._weights)

    @property
    def projections(self) -> int:
        """Times the context was projected."""
        return self.computations

    def _weights(self) -> list[torch.Tensor]:
        return [p for attention in self.attentions for p in attention.context_parameters()]

    def _project(self, contexts: list[torch.Tensor]) -> list[torch.Tensor]:
        (context,) = contexts
        return [tensor for attention in self.attentions for tensor in attention.project_context(context)]

    def _install(self, buffers: list[torch.Tensor] | None) -> None:
        install_context_kv(self.attentions, buffers)


def cross_kv_once(pipeline: Any, policy: Any) -> None:
    """Project the prompt to each cross-attention's keys and values once per image, not every step."""
    wrapped = []
    for name, module in hot_loop_modules(pipeline, policy).items():
        attentions = cross_attentions(module)
        if not attentions or not getattr(module, "cross_attention_context_is_input", False):
            continue
        if not wraps_already(module, CrossKVOnce):
            module.forward = CrossKVOnce(module.forward, attentions, argument_position(module, CONTEXT_ARGUMENT))
            wrapped.append(name)
    if not wrapped:
        logger.info("cross_kv_once: no hot-loop module attends to its encoder_hidden_states as given; nothing changed")
