"""Kandinsky 2.2: an unCLIP prior (text -> CLIP image embedding) feeding an image-conditioned decoder.

* :class:`KandinskyV22PriorPipeline` runs the prior: CLIP text features condition a
  ``PriorTransformer`` that denoises an image embedding with the ``UnCLIPScheduler``. Without a
  negative prompt, the negative image embedding is the CLIP vision encoder's embedding of an
  all-zero image; with one, the negative prompt goes through the prior too.
* :class:`KandinskyV22Pipeline` is the decoder on the core loop: the UNet sees the image embedding
  (as context tokens and added to its time embedding), predicts noise plus a learned-variance half
  that guidance carries along and the scheduler drops unless its ``variance_type`` is learned; the
  MoVQ decodes the latents.
* :class:`KandinskyV22CombinedPipeline` (what ``AutoPipelineForText2Image`` gives for both kinds
  of folders) runs the prior inside ``encode`` and then the decoder loop. Its prior comes from the
  combined folder's ``prior_*`` components, from ``prior=`` (folder, Hub id or loaded prior
  pipeline) or from the decoder's model card (``prior:`` in the README front matter).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from gesso.images import postprocess
from gesso.loading import component_names, read_model_index, resolve_pipeline
from gesso.noise import randn_tensor
from gesso.pipeline import Conditioning, PipelineOutput, Text2ImagePipeline
from gesso.pipeline_loading import DiffusionPipeline
from gesso.text_encoding import negative_prompts, tokenize

import gesso_kandinsky.unet  # noqa: F401 - registers the UNet blocks before any component loads

logger = logging.getLogger("gesso")

PRIOR_COMPONENTS = ("prior", "image_encoder", "text_encoder", "tokenizer", "scheduler", "image_processor")
_HUB_OPTIONS = ("revision", "cache_dir", "local_files_only", "token")


@dataclass
class KandinskyPriorPipelineOutput:
    image_embeds: Any
    negative_image_embeds: Any


def downscale_height_and_width(height: int, width: int, scale_factor: int = 8) -> tuple[int, int]:
    """Latent size for a requested image size: the image size rounded *up* to a multiple of
    ``scale_factor**2``, divided by ``scale_factor`` (so 500 px -> 512 px images)."""

    def latent(size: int) -> int:
        return -(-size // scale_factor**2) * scale_factor

    return latent(height), latent(width)


def _check_callback_inputs(names: Any, allowed: tuple[str, ...]) -> None:
    bad = [k for k in names or () if k not in allowed]
    if bad:
        raise ValueError(f"`callback_on_step_end_tensor_inputs` has to be in {list(allowed)}, but found {bad}")


# -- prior -----------------------------------------------------------------------------------------
class KandinskyV22PriorPipeline(DiffusionPipeline):
    """Text -> CLIP image embedding (and the negative embedding the decoder guides away from)."""

    family = "kandinsky"
    expected_components = ("prior", "image_encoder", "text_encoder", "tokenizer", "scheduler")
    optional_components = ("image_processor",)
    callback_tensor_inputs: ClassVar[tuple[str, ...]] = ("latents", "prompt_embeds", "text_encoder_hidden_states", "text_mask")

    def get_zero_embed(self, batch_size: int = 1, device: torch.device | None = None) -> torch.Tensor:
        """The CLIP embedding of an all-black (all-zero) image: the default negative image embedding."""
        device = device or self.device
        size = self.image_encoder.config.image_size
        zeros = torch.zeros(1, 3, size, size, device=device, dtype=self.image_encoder.dtype)
        return self.image_encoder(zeros)["image_embeds"].repeat(batch_size, 1)

    def _text_features(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = tokenize(self.tokenizer, prompts)
        mask = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).attention_mask
        output = self.text_encoder(ids.to(device))
        return output.text_embeds, output.last_hidden_state, mask.bool().to(device)

    def encode_prompt(
        self,
        prompt: list[str],
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text embeddings, text token states, text mask), one row per image; unconditional rows first when guiding."""
        embeds, states, mask = (t.repeat_interleave(num_images_per_prompt, dim=0) for t in self._text_features(prompt, device))
        if not do_classifier_free_guidance:
            return embeds, states, mask
        negatives = negative_prompts(prompt, negative_prompt, len(prompt))
        neg_embeds, neg_states, neg_mask = (
            t.repeat_interleave(num_images_per_prompt, dim=0) for t in self._text_features(negatives, device)
        )
        return torch.cat([neg_embeds, embeds]), torch.cat([neg_states, states]), torch.cat([neg_mask, mask])

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: int = 25,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        guidance_scale: float = 4.0,
        output_type: str | None = "pt",
        return_dict: bool = True,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
    ) -> KandinskyPriorPipelineOutput | tuple[Any, Any]:
        """Denoise image embeddings for the prompts; arguments and defaults as in the reference prior pipeline.

        A negative prompt is itself run through the prior (its result is the negative image
        embedding); without one the negative is :meth:`get_zero_embed`.
        """
        _check_callback_inputs(callback_on_step_end_tensor_inputs, self.callback_tensor_inputs)
        if isinstance(prompt, str):
            prompt = [prompt]
        elif not isinstance(prompt, list):
            raise ValueError(f"`prompt` has to be of type `str` or `list` but is {type(prompt)}")
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt]
        elif negative_prompt is not None and not isinstance(negative_prompt, list):
            raise ValueError(f"`negative_prompt` has to be of type `str` or `list` but is {type(negative_prompt)}")
        if negative_prompt is not None:  # the negative prompts are denoised alongside, guided by themselves
            prompt = prompt + negative_prompt
            negative_prompt = 2 * negative_prompt
        if output_type not in ("pt", "np"):
            raise ValueError(f"Only the output types `pt` and `np` are supported not output_type={output_type}")
        device = self.device
        batch = len(prompt) * num_images_per_prompt
        guided = guidance_scale > 1
        self._guidance_scale = guidance_scale
        prompt_embeds, text_encoder_hidden_states, text_mask = self.encode_prompt(
            prompt, device, num_images_per_prompt, guided, negative_prompt
        )

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        shape = (batch, self.prior.config.embedding_dim)
        if latents is None:
            latents = randn_tensor(shape, generator, device, prompt_embeds.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"Unexpected latents shape, got {tuple(latents.shape)}, expected {shape}")
        else:
            latents = latents.to(device)
        latents = latents * self.scheduler.init_noise_sigma
        self._num_timesteps = len(timesteps)

        for i, t in enumerate(self.progress_bar(timesteps, total=len(timesteps))):
            model_input = torch.cat([latents] * 2) if guided else latents
            predicted = self.prior(
                model_input,
                timestep=t,
                proj_embedding=prompt_embeds,
                encoder_hidden_states=text_encoder_hidden_states,
                attention_mask=text_mask,
            ).predicted_image_embedding
            if guided:
                uncond, text = predicted.chunk(2)
                predicted = uncond + guidance_scale * (text - uncond)
            prev_timestep = None if i + 1 == len(timesteps) else timesteps[i + 1]
            latents = self.scheduler.step(
                predicted, timestep=t, sample=latents, generator=generator, prev_timestep=prev_timestep
            ).prev_sample
            if callback_on_step_end is not None:
                available = {
                    "latents": latents,
                    "prompt_embeds": prompt_embeds,
                    "text_encoder_hidden_states": text_encoder_hidden_states,
                    "text_mask": text_mask,
                }
                outputs = callback_on_step_end(self, i, t, {k: available[k] for k in callback_on_step_end_tensor_inputs}) or {}
                latents = outputs.get("latents", latents)
                prompt_embeds = outputs.get("prompt_embeds", prompt_embeds)
                text_encoder_hidden_states = outputs.get("text_encoder_hidden_states", text_encoder_hidden_states)
                text_mask = outputs.get("text_mask", text_mask)

        image_embeds = self.prior.post_process_latents(latents)
        if negative_prompt is None:
            negative_embeds = self.get_zero_embed(latents.shape[0], device=latents.device)
        else:
            image_embeds, negative_embeds = image_embeds.chunk(2)
        if output_type == "np":
            image_embeds, negative_embeds = image_embeds.cpu().numpy(), negative_embeds.cpu().numpy()
        if not return_dict:
            return image_embeds, negative_embeds
        return KandinskyPriorPipelineOutput(image_embeds=image_embeds, negative_image_embeds=negative_embeds)


# -- decoder ---------------------------------------------------------------------------------------
class KandinskyV22Pipeline(Text2ImagePipeline):
    """The decoder: image embeddings -> image, on the core loop."""

    family = "kandinsky"
    expected_components = ("unet", "scheduler", "movq")
    default_num_inference_steps = 100
    default_guidance_scale = 4.0
    extra_call_parameters: ClassVar[dict[str, Any]] = {"image_embeds": None, "negative_image_embeds": None}
    callback_tensor_inputs: ClassVar[tuple[str, ...]] = ("latents", "image_embeds", "negative_image_embeds")

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        image_embeds: torch.Tensor | list[torch.Tensor],
        negative_image_embeds: torch.Tensor | list[torch.Tensor],
        height: int = 512,
        width: int = 512,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
    ) -> PipelineOutput | tuple[Any, ...]:
        """Decode image embeddings (from :class:`KandinskyV22PriorPipeline`); as the reference decoder pipeline."""
        return Text2ImagePipeline.__call__(
            self,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            latents=latents,
            output_type=output_type or "pil",
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            image_embeds=image_embeds,
            negative_image_embeds=negative_image_embeds,
        )

    # -- sizes -------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.movq.config.block_out_channels) - 1)

    movq_scale_factor = vae_scale_factor

    def default_size(self, call: Any) -> tuple[int, int]:
        return 512, 512

    def latent_shape(self, call: Any, batch: int) -> tuple[int, ...]:
        height, width = downscale_height_and_width(call.height, call.width, self.vae_scale_factor)
        return (batch, self.unet.config.in_channels, height, width)

    # -- inputs ------------------------------------------------------------------------------
    def check_inputs(self, call: Any) -> None:
        _check_callback_inputs(call.callback_on_step_end_tensor_inputs, self.callback_tensor_inputs)
        if call.output_type not in ("pt", "np", "pil", "latent"):
            raise ValueError(f"Only the output types `pt`, `pil` and `np` are supported not output_type={call.output_type}")
        if call.image_embeds is None or call.negative_image_embeds is None:
            raise ValueError("the decoder needs `image_embeds` and `negative_image_embeds` (from the prior pipeline)")

    def batch_size(self, call: Any) -> int:
        embeds = call.image_embeds
        return sum(e.shape[0] for e in embeds) if isinstance(embeds, list | tuple) else embeds.shape[0]

    def uses_guidance(self, call: Any) -> bool:
        return call.guidance_scale > 1

    def encode(self, call: Any, device: torch.device) -> Conditioning:
        return self.image_conditioning(
            call.image_embeds, call.negative_image_embeds, call.num_images_per_prompt, call.do_classifier_free_guidance, device
        )

    def image_conditioning(
        self, image_embeds: Any, negative_image_embeds: Any, num_images_per_prompt: int, guided: bool, device: torch.device
    ) -> Conditioning:
        if isinstance(image_embeds, list | tuple):
            image_embeds = torch.cat(list(image_embeds))
        if isinstance(negative_image_embeds, list | tuple):
            negative_image_embeds = torch.cat(list(negative_image_embeds))
        image_embeds = image_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        negative_image_embeds = negative_image_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        conditioned = torch.cat([negative_image_embeds, image_embeds]) if guided else image_embeds
        conditioned = conditioned.to(dtype=self.unet.dtype, device=device)
        return Conditioning(
            encoder_hidden_states=None,
            added_cond_kwargs={"image_embeds": conditioned},
            extra={"negative_image_embeds": negative_image_embeds, "positive_image_embeds": image_embeds},
        )

    # -- the step ----------------------------------------------------------------------------
    def _drop_variance(self, prediction: torch.Tensor, channels: int) -> torch.Tensor:
        if getattr(self.scheduler.config, "variance_type", None) in ("learned", "learned_range"):
            return prediction
        return prediction[:, :channels] if prediction.shape[1] > channels else prediction

    def denoise(
        self, model_input: torch.Tensor, t: torch.Tensor, conditioning: Conditioning, extra: dict[str, Any], call: Any
    ) -> torch.Tensor:
        prediction = self.unet(
            model_input, t, encoder_hidden_states=None, added_cond_kwargs=conditioning.added_cond_kwargs, return_dict=False, **extra
        )[0]
        if call.do_classifier_free_guidance:
            return prediction  # guide() needs the variance half
        return self._drop_variance(prediction, model_input.shape[1])

    def guide(self, prediction: torch.Tensor, call: Any, latents: torch.Tensor) -> torch.Tensor:
        channels = latents.shape[1]
        noise, variance = prediction[:, :channels], prediction[:, channels:]
        uncond, text = noise.chunk(2)
        guided = uncond + call.guidance_scale * (text - uncond)
        if variance.shape[1]:
            guided = torch.cat([guided, variance.chunk(2)[1]], dim=1)
        return self._drop_variance(guided, channels)

    def prepare_timesteps(self, call: Any, device: torch.device) -> torch.Tensor:
        self.scheduler.set_timesteps(call.num_inference_steps, device=device)
        return self.scheduler.timesteps

    def _callback_tensors(self, latents: torch.Tensor, conditioning: Conditioning) -> dict[str, Any]:
        return {
            "latents": latents,
            "image_embeds": conditioning.added_cond_kwargs["image_embeds"],
            "negative_image_embeds": conditioning.extra["negative_image_embeds"],
        }

    # -- output ------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor, call: Any) -> torch.Tensor:
        return self.movq.decode(latents, force_not_quantize=True).sample

    def _finish(
        self, latents: torch.Tensor, call: Any, device: torch.device, conditioning: Conditioning
    ) -> PipelineOutput | tuple[Any, ...]:
        if call.output_type == "latent":
            images = latents
        elif call.output_type == "pt":
            images = self.decode(latents, call)  # the reference returns the decoder's [-1, 1] output as it is
        else:
            images = postprocess(self.decode(latents, call), call.output_type)
        if not call.return_dict:
            return (images,)
        return PipelineOutput(images=images)


# -- prior + decoder -------------------------------------------------------------------------------
class KandinskyV22CombinedPipeline(KandinskyV22Pipeline):
    """Text -> image: the prior, then the decoder. Components are the decoder's plus ``prior_*``."""

    expected_components = ("unet", "scheduler", "movq")
    optional_components = tuple(f"prior_{name}" for name in PRIOR_COMPONENTS)
    extra_call_parameters: ClassVar[dict[str, Any]] = {
        "prior_guidance_scale": 4.0,
        "prior_num_inference_steps": 25,
        "prior_callback_on_step_end": None,
        "prior_callback_on_step_end_tensor_inputs": ("latents",),
        "prior": None,
    }

    @property
    def prior_pipe(self) -> KandinskyV22PriorPipeline:
        """The prior as a pipeline of its own, over this pipeline's ``prior_*`` components."""
        missing = [f"prior_{n}" for n in KandinskyV22PriorPipeline.expected_components if getattr(self, f"prior_{n}", None) is None]
        if missing:
            raise ValueError(
                f"{type(self).__name__} has no prior ({', '.join(missing)} missing): load it with prior=<folder, Hub id or "
                "KandinskyV22PriorPipeline>, from a combined checkpoint, or from a decoder whose model card names its prior"
            )
        prior = KandinskyV22PriorPipeline(**{name: getattr(self, f"prior_{name}") for name in PRIOR_COMPONENTS})
        prior._execution_device = getattr(self, "_execution_device", None)  # offloading: run where the decoder runs
        return prior

    @property
    def decoder_pipe(self) -> KandinskyV22Pipeline:
        return KandinskyV22Pipeline(unet=self.unet, scheduler=self.scheduler, movq=self.movq)

    def set_prior(self, prior: Any, **loading: Any) -> None:
        """Replace the ``prior_*`` components by those of ``prior`` (a prior pipeline, folder or Hub id)."""
        if not isinstance(prior, DiffusionPipeline):
            dtype = loading.pop("torch_dtype", None) or (self.unet.dtype if self.unet is not None else None)
            prior = KandinskyV22PriorPipeline.from_pretrained(prior, torch_dtype=dtype, **loading)
            prior.to(self.device)
        for name, component in prior.components.items():
            setattr(self, f"prior_{name}", component)
        self._loaded_prior = prior

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        height: int = 512,
        width: int = 512,
        prior_guidance_scale: float = 4.0,
        prior_num_inference_steps: int = 25,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        prior_callback_on_step_end: Any = None,
        prior_callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        prior: Any = None,
    ) -> PipelineOutput | tuple[Any, ...]:
        """Generate images from text; arguments and defaults as in the reference combined pipeline.

        ``latents`` are the prior's initial noise (as in the reference); ``prior=`` loads a prior
        first when this pipeline has none (a decoder checkpoint loaded without one).
        """
        if prior is not None and getattr(self, "_prior_source", None) != prior:
            self.set_prior(prior)
            self._prior_source = prior
        return Text2ImagePipeline.__call__(
            self,
            prompt=prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            latents=latents,
            output_type=output_type or "pil",
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            prior_guidance_scale=prior_guidance_scale,
            prior_num_inference_steps=prior_num_inference_steps,
            prior_callback_on_step_end=prior_callback_on_step_end,
            prior_callback_on_step_end_tensor_inputs=prior_callback_on_step_end_tensor_inputs,
        )

    def check_inputs(self, call: Any) -> None:
        _check_callback_inputs(call.callback_on_step_end_tensor_inputs, self.callback_tensor_inputs)
        _check_callback_inputs(call.prior_callback_on_step_end_tensor_inputs, KandinskyV22PriorPipeline.callback_tensor_inputs)
        if call.output_type not in ("pt", "np", "pil", "latent"):
            raise ValueError(f"Only the output types `pt`, `pil` and `np` are supported not output_type={call.output_type}")
        if call.prompt is None or not isinstance(call.prompt, str | list):
            raise ValueError(f"`prompt` has to be of type `str` or `list` but is {type(call.prompt)}")

    def batch_size(self, call: Any) -> int:
        return 1 if isinstance(call.prompt, str) else len(call.prompt)

    def encode(self, call: Any, device: torch.device) -> Conditioning:
        prior = self.prior_pipe
        prior.set_progress_bar_config(**self._progress_bar_config)
        image_embeds, negative_image_embeds = prior(
            prompt=call.prompt,
            negative_prompt=call.negative_prompt,
            num_images_per_prompt=call.num_images_per_prompt,
            num_inference_steps=call.prior_num_inference_steps,
            generator=call.generator,
            latents=call.latents,
            guidance_scale=call.prior_guidance_scale,
            output_type="pt",
            return_dict=False,
            callback_on_step_end=call.prior_callback_on_step_end,
            callback_on_step_end_tensor_inputs=call.prior_callback_on_step_end_tensor_inputs,
        )
        return self.image_conditioning(image_embeds, negative_image_embeds, 1, call.do_classifier_free_guidance, device)

    def prepare_latents(self, call: Any, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The decoder's noise is always drawn here: ``latents`` were the prior's."""
        shape = self.latent_shape(call, batch)
        return randn_tensor(shape, call.generator, device, dtype) * self.scheduler.init_noise_sigma

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> KandinskyV22CombinedPipeline:  # type: ignore[override]
        """A combined folder, or a decoder folder with its prior (``prior=`` or the model card's)."""
        hub = {k: kwargs.pop(k) for k in _HUB_OPTIONS if k in kwargs}
        loading = {k: kwargs[k] for k in ("variant", "use_safetensors") if k in kwargs}
        folder = resolve_pipeline(pretrained_model_name_or_path, **loading, **hub)
        pipeline = cls.from_folder(folder, _hub_options=hub, **kwargs)
        pipeline.name_or_path = str(pretrained_model_name_or_path)
        return pipeline

    @classmethod
    def from_folder(  # type: ignore[override]
        cls,
        folder: Path,
        *,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        device_map: str | torch.device | None = None,
        prior: Any = None,
        _hub_options: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> KandinskyV22CombinedPipeline:
        folder = Path(folder)
        has_prior = any(name.startswith("prior_") for name in component_names(read_model_index(folder)))
        if prior is None and not has_prior:
            prior = prior_from_model_card(folder)
        prior_names = [f"prior_{n}" for n in PRIOR_COMPONENTS]
        if prior is not None and not all(n in overrides for n in prior_names):
            if not isinstance(prior, DiffusionPipeline):
                hub = dict(_hub_options) if _hub_options else hub_options_of(folder)
                prior = KandinskyV22PriorPipeline.from_pretrained(
                    prior, torch_dtype=torch_dtype, variant=variant, use_safetensors=use_safetensors, device_map=device_map, **hub
                )
            for name, component in prior.components.items():
                overrides.setdefault(f"prior_{name}", component)
        elif prior is None and not has_prior:
            logger.warning(
                "%s is a Kandinsky 2.2 decoder without a prior: pass prior=<folder or Hub id> (to from_pretrained or to the call)", folder
            )
        return super().from_folder(
            folder, torch_dtype=torch_dtype, variant=variant, use_safetensors=use_safetensors, device_map=device_map, **overrides
        )

    @classmethod
    def pipeline_class_name(cls) -> str:
        return cls.__name__


def prior_from_model_card(folder: Path) -> str | None:
    """The prior a decoder's model card names (``prior:`` in the README.md front matter), if any."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    import yaml

    try:
        metadata = yaml.safe_load(text[3:end]) or {}
    except yaml.YAMLError:
        logger.warning("%s: the model card's front matter is not valid YAML; no prior read from it", readme)
        return None
    value = metadata.get("prior") if isinstance(metadata, dict) else None
    if isinstance(value, list):
        value = value[0] if value else None
    return str(value) if value else None


def hub_options_of(folder: Path) -> dict[str, Any]:
    """A folder inside a Hub cache (``<cache>/models--org--name/snapshots/<rev>``) names that cache,
    so a prior it refers to is looked up in the same place."""
    folder = Path(folder)
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return {"cache_dir": str(folder.parent.parent.parent)}
    return {}
