"""A model's per-image conditioning, computed once an image instead of at every denoising step.

What a UNet adds to its timestep embedding, and the context its attentions attend to, are in the
published families functions of inputs that stay the same for a whole image:

* SDXL's addition embedding (``text_time``): the pooled prompt and the six size and crop ids
  through a sinusoid and a two-layer MLP, a dozen small kernels a step (and as many again in an
  SDXL ControlNet);
* Kandinsky 2.2's image embedding: added to the timestep embedding (``image``) and projected to
  32 context tokens (``image_proj``, a 1280 x 24576 matrix read at every step), which each of the
  decoder's 22 attentions then normalises and projects to keys and values.

``conditioning_once`` wraps each hot-loop module that has the slots for it
(:func:`gesso.nn.unet_2d_condition.register_precomputed_conditioning`). Before a call it computes
what depends only on ``encoder_hidden_states`` and ``added_cond_kwargs`` — the addition embedding
and the projected context, where their modules declare ``per_image``, and the keys and values of
the attentions over a projected context — into buffers the model reads instead, and it computes
again only when an input or a weight is not that of the last call (:mod:`gesso.optimize.once`
says how that is decided without waiting for the GPU). The keys and values of a context that is
the model's input are ``cross_kv_once``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from gesso.optimize import hot_loop_modules
from gesso.optimize.cross_kv import cross_attentions, install_context_kv
from gesso.optimize.once import OncePerInput, argument_position, argument_value, wraps_already

logger = logging.getLogger("gesso")

STATES_ARGUMENT = "encoder_hidden_states"
ADDED_ARGUMENT = "added_cond_kwargs"


def _per_image(module: torch.nn.Module | None) -> bool:
    return module is not None and getattr(type(module), "per_image", False)


class ConditioningOnce(OncePerInput):
    """``forward`` of one model, with its per-image conditioning computed beforehand."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.addition = _per_image(model.add_embedding)
        self.context = not model.cross_attention_context_is_input and _per_image(model.encoder_hid_proj)
        self.attentions = cross_attentions(model) if self.context else []
        self.states_position = argument_position(model, STATES_ARGUMENT)
        self.layout: tuple[bool, tuple[str, ...]] | None = None  # whether states came, and the added keys, in input order
        super().__init__(
            model.forward, ADDED_ARGUMENT, argument_position(model, ADDED_ARGUMENT), self._conditioning, self._install, self._weights
        )

    @property
    def needed(self) -> bool:
        """Whether the model has any per-image conditioning to compute ahead."""
        return self.addition or self.context

    def value(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The text states and the added conditioning."""
        return argument_value(args, kwargs, STATES_ARGUMENT, self.states_position), super().value(args, kwargs)

    def inputs(self, value: Any) -> list[torch.Tensor] | None:
        """The states (when given as a tensor) and every tensor of the added conditioning, by key."""
        states, added = value
        added = added or {}
        if not isinstance(added, Mapping) or not all(isinstance(tensor, torch.Tensor) for tensor in added.values()):
            return None
        layout = (isinstance(states, torch.Tensor), tuple(sorted(added)))
        if layout != self.layout:  # the same tensors under other names would give other results
            self.clear()
            self.layout = layout
        tensors = ([states] if layout[0] else []) + [added[key] for key in layout[1]]
        return tensors or None

    def _conditioning(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        with_states, keys = self.layout
        states = tensors[0] if with_states else None
        added = dict(zip(keys, tensors[1:] if with_states else tensors, strict=True))
        results = []
        if self.addition:
            results.append(self.model.add_embedding(emb=None, encoder_hidden_states=states, added_cond_kwargs=added))
        if self.context:
            context = self.model.encoder_hid_proj(states, added)
            results.append(context)
            results.extend(tensor for attention in self.attentions for tensor in attention.project_context(context))
        return results

    def _install(self, buffers: list[torch.Tensor] | None) -> None:
        rest = list(buffers) if buffers is not None else None
        if self.addition:
            self.model.precomputed_addition = rest.pop(0) if rest is not None else None
        if self.context:
            self.model.precomputed_context = rest.pop(0) if rest is not None else None
            install_context_kv(self.attentions, rest)

    def _weights(self) -> list[torch.Tensor]:
        modules = ([self.model.add_embedding] if self.addition else []) + ([self.model.encoder_hid_proj] if self.context else [])
        weights = [p for module in modules for p in module.parameters()]
        return weights + [p for attention in self.attentions for p in attention.context_parameters()]


def conditioning_once(pipeline: Any, policy: Any) -> None:
    """Compute each hot-loop model's per-image conditioning once an image, not at every step."""
    wrapped = []
    for name, module in hot_loop_modules(pipeline, policy).items():
        if not hasattr(module, "precomputed_addition") or wraps_already(module, ConditioningOnce):
            continue
        wrapper = ConditioningOnce(module)
        if wrapper.needed:
            module.forward = wrapper
            wrapped.append(name)
    if not wrapped:
        logger.info("conditioning_once: no hot-loop model has per-image conditioning to compute ahead; nothing changed")
