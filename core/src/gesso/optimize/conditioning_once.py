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
(:func:`gesso.nn.unet_2d_condition.register_precomputed_conditioning`), or holds models that do and
hands them its inputs as given (``conditioning_passed_to``). Before a call it computes
what depends only on ``encoder_hidden_states`` and ``added_cond_kwargs`` — the addition embedding
and the projected context, where their modules declare ``per_image``, and the keys and values of
the attentions over a projected context — into buffers the model reads instead, and it computes
again only when an input or a weight is not that of the last call (:mod:`gesso.optimize.once`
says how that is decided without waiting for the GPU). The keys and values of a context that is
the model's input are ``cross_kv_once``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
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


def conditioned_models(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The models whose per-image conditioning a call of ``module`` can have computed ahead:
    ``module`` itself where it has the slots, else the models it hands its ``encoder_hidden_states``
    and ``added_cond_kwargs`` as given (``conditioning_passed_to``: a MultiControlNet's nets)."""
    if hasattr(module, "precomputed_addition"):
        return [module]
    return [model for model in getattr(module, "conditioning_passed_to", ()) if hasattr(model, "precomputed_addition")]


class ModelConditioning:
    """One model's per-image conditioning: what it has to compute, where its results go."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.addition = _per_image(model.add_embedding)
        self.context = not model.cross_attention_context_is_input and _per_image(model.encoder_hid_proj)
        self.attentions = cross_attentions(model) if self.context else []

    def compute(self, states: torch.Tensor | None, added: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        results = []
        if self.addition:
            results.append(self.model.add_embedding(emb=None, encoder_hidden_states=states, added_cond_kwargs=added))
        if self.context:
            context = self.model.encoder_hid_proj(states, added)
            results.append(context)
            results.extend(tensor for attention in self.attentions for tensor in attention.project_context(context))
        return results

    def install(self, buffers: Iterator[torch.Tensor] | None) -> None:
        """Take this model's buffers from ``buffers`` in :meth:`compute`'s order (``None``: compute in the call)."""
        if self.addition:
            self.model.precomputed_addition = next(buffers) if buffers is not None else None
        if self.context:
            self.model.precomputed_context = next(buffers) if buffers is not None else None
            install_context_kv(self.attentions, [next(buffers) for _ in range(2 * len(self.attentions))] if buffers is not None else None)

    def weights(self) -> list[torch.Tensor]:
        modules = ([self.model.add_embedding] if self.addition else []) + ([self.model.encoder_hid_proj] if self.context else [])
        weights = [p for module in modules for p in module.parameters()]
        return weights + [p for attention in self.attentions for p in attention.context_parameters()]


class ConditioningOnce(OncePerInput):
    """``forward`` of one hot-loop module, with the per-image conditioning of its models computed beforehand."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.models = [part for part in map(ModelConditioning, conditioned_models(module)) if part.addition or part.context]
        self.states_position = argument_position(module, STATES_ARGUMENT)
        self.layout: tuple[bool, tuple[str, ...]] | None = None  # whether states came, and the added keys, in input order
        super().__init__(
            module.forward, ADDED_ARGUMENT, argument_position(module, ADDED_ARGUMENT), self._conditioning, self._install, self._weights
        )

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
        return [result for part in self.models for result in part.compute(states, added)]

    def _install(self, buffers: list[torch.Tensor] | None) -> None:
        remaining = iter(buffers) if buffers is not None else None
        for part in self.models:
            part.install(remaining)

    def _weights(self) -> list[torch.Tensor]:
        return [weight for part in self.models for weight in part.weights()]


def conditioning_once(pipeline: Any, policy: Any) -> None:
    """Compute each hot-loop model's per-image conditioning once an image, not at every step."""
    wrapped = []
    for name, module in hot_loop_modules(pipeline, policy).items():
        if wraps_already(module, ConditioningOnce):
            continue
        wrapper = ConditioningOnce(module)
        if wrapper.models:  # some model has per-image conditioning to compute ahead
            module.forward = wrapper
            wrapped.append(name)
    if not wrapped:
        logger.info("conditioning_once: no hot-loop model has per-image conditioning to compute ahead; nothing changed")
