"""The one text-to-image loop: check inputs -> encode -> denoise -> decode -> output.

Families subclass :class:`Text2ImagePipeline` and contribute what differs — ``encode`` (text
encoders, added conditioning such as SDXL's time ids or Kandinsky's image embedding), ``guide``
(how classifier-free guidance combines predictions) and ``decode`` — never a copy of the loop.
Conditioners attached to the pipeline (ControlNet) add their inputs to each denoiser call.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

import torch

from gesso.conditioning import merge_step_inputs
from gesso.images import OUTPUT_TYPES, postprocess
from gesso.noise import randn_tensor
from gesso.pipeline_loading import DiffusionPipeline


@dataclass
class PipelineOutput:
    images: Any
    nsfw_content_detected: list[bool] | None = None


@dataclass
class Conditioning:
    """What the denoiser is conditioned on; with guidance, the unconditional half comes first."""

    encoder_hidden_states: torch.Tensor | None
    added_cond_kwargs: dict[str, torch.Tensor] | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def rescale_guidance(guided: torch.Tensor, text: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules ...", section 3.4)."""
    dims = list(range(1, text.ndim))
    rescaled = guided * (text.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


def set_timesteps(
    scheduler: Any, num_inference_steps: int | None, device: torch.device, timesteps: Any = None, sigmas: Any = None
) -> tuple[torch.Tensor, int]:
    """Configure the scheduler for explicit timesteps, explicit sigmas or a step count."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("Only one of `timesteps` or `sigmas` can be passed. Please choose one to set custom values")
    accepted = set(inspect.signature(scheduler.set_timesteps).parameters)
    for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
        if value is not None:
            if name not in accepted:
                raise ValueError(
                    f"The current scheduler class {type(scheduler)}'s `set_timesteps` does not support custom {name} schedules."
                )
            scheduler.set_timesteps(**{name: value}, device=device)
            return scheduler.timesteps, len(scheduler.timesteps)
    scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler.timesteps, num_inference_steps


class Text2ImagePipeline(DiffusionPipeline):
    """The generic loop. Class attributes give the family's call defaults."""

    default_num_inference_steps: ClassVar[int] = 50
    default_guidance_scale: ClassVar[float] = 7.5
    extra_call_parameters: ClassVar[dict[str, Any]] = {}
    callback_tensor_inputs: ClassVar[tuple[str, ...]] = ("latents", "prompt_embeds", "negative_prompt_embeds")
    #: Names under which ``callback_on_step_end`` sees (and replaces) ``added_cond_kwargs`` entries
    #: (SDXL: ``text_embeds`` -> ``add_text_embeds``); entries not listed keep their own name.
    callback_added_cond_names: ClassVar[dict[str, str]] = {}

    # -- the family's part ---------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8

    def default_size(self, call: Any) -> tuple[int, int]:
        for conditioner in self.conditioners:
            size = conditioner.default_size(call)
            if size is not None:
                return size
        sample_size = self.unet.config.sample_size
        size = sample_size if isinstance(sample_size, int) else sample_size[0]
        return size * self.vae_scale_factor, size * self.vae_scale_factor

    def check_inputs(self, call: Any) -> None:
        if call.height % 8 != 0 or call.width % 8 != 0:
            raise ValueError(f"`height` and `width` have to be divisible by 8 but are {call.height} and {call.width}.")
        bad = [k for k in call.callback_on_step_end_tensor_inputs if k not in self.callback_tensor_inputs]
        if bad:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` has to be in {list(self.callback_tensor_inputs)}, but found {bad}")
        if call.prompt is not None and call.prompt_embeds is not None:
            raise ValueError(
                f"Cannot forward both `prompt`: {call.prompt} and `prompt_embeds`. Please make sure to only forward one of the two."
            )
        if call.prompt is None and call.prompt_embeds is None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`. Cannot leave both `prompt` and `prompt_embeds` undefined.")
        if call.prompt is not None and not isinstance(call.prompt, str | list):
            raise ValueError(f"`prompt` has to be of type `str` or `list` but is {type(call.prompt)}")
        if call.negative_prompt is not None and call.negative_prompt_embeds is not None:
            raise ValueError(
                "Cannot forward both `negative_prompt` and `negative_prompt_embeds`. Please make sure to only forward one of the two."
            )
        if (
            call.prompt_embeds is not None
            and call.negative_prompt_embeds is not None
            and call.prompt_embeds.shape != call.negative_prompt_embeds.shape
        ):
            raise ValueError(
                "`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, but got: "
                f"`prompt_embeds` {call.prompt_embeds.shape} != `negative_prompt_embeds` {call.negative_prompt_embeds.shape}."
            )
        if call.output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {', '.join(OUTPUT_TYPES)}, but is {call.output_type!r}")
        for conditioner in self.conditioners:
            conditioner.check_inputs(call)

    def batch_size(self, call: Any) -> int:
        if isinstance(call.prompt, str):
            return 1
        if isinstance(call.prompt, list):
            return len(call.prompt)
        return call.prompt_embeds.shape[0]

    def uses_guidance(self, call: Any) -> bool:
        return call.guidance_scale > 1 and getattr(self.unet.config, "time_cond_proj_dim", None) is None

    def encode(self, call: Any, device: torch.device) -> Conditioning:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement encode()")

    def latent_shape(self, call: Any, batch: int) -> tuple[int, ...]:
        channels = self.unet.config.in_channels
        return (batch, channels, call.height // self.vae_scale_factor, call.width // self.vae_scale_factor)

    def prepare_latents(self, call: Any, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        shape = self.latent_shape(call, batch)
        if isinstance(call.generator, list) and len(call.generator) != batch:
            raise ValueError(
                f"You have passed a list of generators of length {len(call.generator)}, but requested an effective batch"
                f" size of {batch}. Make sure the batch size matches the length of the generators."
            )
        if call.latents is None:
            latents = randn_tensor(shape, call.generator, device, dtype)
        else:
            latents = call.latents.to(device)
        return latents * self.scheduler.init_noise_sigma

    def prepare_timesteps(self, call: Any, device: torch.device) -> torch.Tensor:
        timesteps, _ = set_timesteps(self.scheduler, call.num_inference_steps, device, call.timesteps, call.sigmas)
        return timesteps

    def denoise(
        self, model_input: torch.Tensor, t: torch.Tensor, conditioning: Conditioning, extra: dict[str, Any], call: Any
    ) -> torch.Tensor:
        return self.unet(
            model_input,
            t,
            encoder_hidden_states=conditioning.encoder_hidden_states,
            added_cond_kwargs=conditioning.added_cond_kwargs,
            cross_attention_kwargs=call.cross_attention_kwargs,
            return_dict=False,
            **extra,
        )[0]

    def guide(self, prediction: torch.Tensor, call: Any, latents: torch.Tensor) -> torch.Tensor:
        uncond, text = prediction.chunk(2)
        guided = uncond + call.guidance_scale * (text - uncond)
        if call.guidance_rescale > 0.0:
            guided = rescale_guidance(guided, text, call.guidance_rescale)
        return guided

    def decode(self, latents: torch.Tensor, call: Any) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]

    def check_safety(self, images: torch.Tensor, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, list[bool] | None]:
        return images, None

    # -- the loop ------------------------------------------------------------------------------
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._do_cfg

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        **kwargs: Any,
    ) -> PipelineOutput | tuple[Any, Any]:
        """Generate images from text; arguments and defaults as in the reference pipelines."""
        call = SimpleNamespace(**{k: v for k, v in locals().items() if k not in ("self", "kwargs", "__class__")})
        self._bind_extra_arguments(call, kwargs)
        if call.num_inference_steps is None:
            call.num_inference_steps = self.default_num_inference_steps
        if call.guidance_scale is None:
            call.guidance_scale = self.default_guidance_scale
        call.num_images_per_prompt = call.num_images_per_prompt or 1
        if call.height is None or call.width is None:
            default_height, default_width = self.default_size(call)
            call.height = call.height or default_height
            call.width = call.width or default_width
        self.check_inputs(call)

        self._guidance_scale = call.guidance_scale
        self._interrupt = False
        self._do_cfg = self.uses_guidance(call)
        call.do_classifier_free_guidance = self._do_cfg
        device = self.device
        batch = self.batch_size(call) * call.num_images_per_prompt

        conditioning = self.encode(call, device)
        timesteps = self.prepare_timesteps(call, device)
        self._num_timesteps = len(timesteps)
        dtype = conditioning.encoder_hidden_states.dtype if conditioning.encoder_hidden_states is not None else self.unet.dtype
        latents = self.prepare_latents(call, batch, dtype, device)
        step_options = self._scheduler_step_options(call)
        for conditioner in self.conditioners:
            conditioner.prepare(self, call, conditioning, device, dtype)

        for i, t in enumerate(self.progress_bar(timesteps, total=len(timesteps))):
            if self._interrupt:
                continue
            model_input = torch.cat([latents] * 2) if self._do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            extra = merge_step_inputs([c.step_inputs(self, call, i, t, model_input, conditioning) for c in self.conditioners])
            prediction = self.denoise(model_input, t, conditioning, extra, call)
            if self._do_cfg:
                prediction = self.guide(prediction, call, latents)
            latents = self.scheduler.step(prediction, t, latents, **step_options, return_dict=False)[0]
            if call.callback_on_step_end is not None:
                latents = self._run_callback(call, i, t, latents, conditioning)

        return self._finish(latents, call, device, conditioning)

    def _finish(
        self, latents: torch.Tensor, call: Any, device: torch.device, conditioning: Conditioning
    ) -> PipelineOutput | tuple[Any, Any]:
        nsfw = None
        if call.output_type == "latent":
            images = latents
        else:
            images = self.decode(latents, call)
            images, nsfw = self.check_safety(
                images, device, conditioning.encoder_hidden_states.dtype if conditioning.encoder_hidden_states is not None else images.dtype
            )
            mask = None if nsfw is None else [not flagged for flagged in nsfw]
            images = postprocess(images, call.output_type, mask)
        if not call.return_dict:
            return images, nsfw
        return PipelineOutput(images=images, nsfw_content_detected=nsfw)

    def _bind_extra_arguments(self, call: SimpleNamespace, kwargs: dict[str, Any]) -> None:
        accepted = dict(self.extra_call_parameters)
        for conditioner in self.conditioners:
            accepted.update(conditioner.call_parameters)
        unknown = [k for k in kwargs if k not in accepted]
        if unknown:
            raise TypeError(f"{type(self).__name__}.__call__() got an unexpected keyword argument {unknown[0]!r}")
        for name, default in accepted.items():
            setattr(call, name, kwargs.get(name, default))

    def _scheduler_step_options(self, call: Any) -> dict[str, Any]:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        options = {}
        if "eta" in accepted:
            options["eta"] = call.eta
        if "generator" in accepted:
            options["generator"] = call.generator
        return options

    def _callback_tensors(self, latents: torch.Tensor, conditioning: Conditioning) -> dict[str, Any]:
        return {
            "latents": latents,
            "prompt_embeds": conditioning.encoder_hidden_states,
            "negative_prompt_embeds": conditioning.negative_prompt_embeds,
            **{self.callback_added_cond_names.get(k, k): v for k, v in (conditioning.added_cond_kwargs or {}).items()},
        }

    def _run_callback(self, call: Any, step: int, t: torch.Tensor, latents: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        available = self._callback_tensors(latents, conditioning)
        inputs = {k: available[k] for k in call.callback_on_step_end_tensor_inputs}
        outputs = call.callback_on_step_end(self, step, t, inputs) or {}
        if "prompt_embeds" in outputs:
            conditioning.encoder_hidden_states = outputs["prompt_embeds"]
        if "negative_prompt_embeds" in outputs:
            conditioning.negative_prompt_embeds = outputs["negative_prompt_embeds"]
        for key in conditioning.added_cond_kwargs or {}:
            name = self.callback_added_cond_names.get(key, key)
            if name in outputs:
                conditioning.added_cond_kwargs[key] = outputs[name]
        return outputs.get("latents", latents)
