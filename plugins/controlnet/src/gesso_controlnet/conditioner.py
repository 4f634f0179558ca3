"""The ``controlnet=`` conditioner: runs the ControlNet(s) before each UNet call and hands over residuals.

``AutoPipelineForText2Image.from_pretrained(base, controlnet=net)`` calls :data:`attach`, which sets
``pipeline.controlnet`` (a :class:`MultiControlNetModel` for a list, as the reference does) and
returns a :class:`ControlNetConditioner`. The conditioner reads ``pipeline.controlnet`` at each
call, so a replaced or compiled net is used. Arguments, checks, image preparation, guess mode and
the control-guidance window follow the reference's ControlNet pipelines.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from gesso.conditioning import Conditioner

from gesso_controlnet import images as control_images
from gesso_controlnet.model import ControlNetModel, MultiControlNetModel
from gesso_controlnet.plugin import CONFIG_KEYS


def unwrap(module: Any) -> Any:
    """The module behind ``torch.compile``."""
    return getattr(module, "_orig_mod", module)


def as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


#: The UNet's keyword argument that carries a step's net call when the UNet runs the net itself
#: (``controlnet_side_stream``): ``{"arguments": the net's keyword arguments, "split": bool}``.
NET_CALL = "controlnet_call"


class ControlNetConditioner(Conditioner):
    name = "controlnet"
    call_parameters = dict(CONFIG_KEYS)
    #: Set by ``controlnet_side_stream``: each step hands the UNet the net's arguments (``NET_CALL``)
    #: instead of the net's residuals, and the UNet runs the net alongside its down blocks and mid block.
    runs_in_unet = False

    def __init__(self, pipeline: Any) -> None:
        self._pipeline = weakref.ref(pipeline)

    # -- the net(s) ------------------------------------------------------------------------------
    @property
    def controlnet(self) -> Any:
        pipeline = self._pipeline()
        if pipeline is None:
            raise RuntimeError("the pipeline this ControlNet conditioner was attached to no longer exists")
        return pipeline.controlnet

    @property
    def is_multi(self) -> bool:
        return isinstance(unwrap(self.controlnet), MultiControlNetModel)

    @property
    def nets(self) -> list[ControlNetModel]:
        net = unwrap(self.controlnet)
        return list(net.nets) if isinstance(net, MultiControlNetModel) else [net]

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"controlnet": self.controlnet}

    # -- arguments -------------------------------------------------------------------------------
    def _window(self, call: Any) -> tuple[list[float], list[float]]:
        """``control_guidance_start`` / ``_end`` as lists, one per net, as the reference expands them."""
        start, end = call.control_guidance_start, call.control_guidance_end
        if not isinstance(start, list | tuple) and isinstance(end, list | tuple):
            start = [start] * len(end)
        elif not isinstance(end, list | tuple) and isinstance(start, list | tuple):
            end = [end] * len(start)
        elif not isinstance(start, list | tuple) and not isinstance(end, list | tuple):
            count = len(self.nets) if self.is_multi else 1
            start, end = [start] * count, [end] * count
        return list(start), list(end)

    def _images_per_net(self, call: Any) -> list[Any]:
        """The image argument split per net (a list of per-prompt lists is transposed, as on SD1.5)."""
        if not self.is_multi:
            return [call.image]
        image = call.image
        if isinstance(image[0], list) and getattr(self._pipeline(), "family", "") == "sd15":
            return [list(column) for column in zip(*image)]
        return list(image)

    def default_size(self, call: Any) -> tuple[int, int] | None:
        image = call.image
        if self.is_multi:
            if not isinstance(image, list) or not image:
                return None
            image = self._images_per_net(call)[0]
        size = control_images.natural_size(image, self._pipeline().vae_scale_factor)
        if size is None:
            return None
        return call.height or size[0], call.width or size[1]

    def check_inputs(self, call: Any) -> None:
        image = call.image
        if not self.is_multi:
            self._check_image(image, call)
        elif not isinstance(image, list):
            raise TypeError("For multiple controlnets: `image` must be type `list`")
        elif any(isinstance(item, list) for item in image):
            transposed = [list(column) for column in zip(*image)]
            if len(transposed) != len(self.nets):
                raise ValueError(
                    "For multiple controlnets: if you pass`image` as a list of list, each sublist must have the same length as the "
                    f"number of controlnets, but the sublists in `image` got {len(transposed)} images and {len(self.nets)} ControlNets."
                )
            for column in transposed:
                self._check_image(column, call)
        elif len(image) != len(self.nets):
            raise ValueError(
                f"For multiple controlnets: `image` must have the same length as the number of controlnets, but got {len(image)} images and {len(self.nets)} ControlNets."
            )
        else:
            for item in image:
                self._check_image(item, call)

        scale = call.controlnet_conditioning_scale
        if not self.is_multi and not isinstance(scale, float):
            raise TypeError("For single controlnet: `controlnet_conditioning_scale` must be type `float`.")
        if self.is_multi and isinstance(scale, list | tuple):
            if any(isinstance(item, list | tuple) for item in scale):
                raise ValueError(
                    "A single batch of varying conditioning scale settings (e.g. [[1.0, 0.5], [0.2, 0.8]]) is not supported at the moment. "
                    "The conditioning scale must be fixed across the batch."
                )
            if len(scale) != len(self.nets):
                raise ValueError(
                    "For multiple controlnets: When `controlnet_conditioning_scale` is specified as `list`, it must have"
                    " the same length as the number of controlnets"
                )

        starts, ends = self._window(call)
        if len(starts) != len(ends):
            raise ValueError(
                f"`control_guidance_start` has {len(starts)} elements, but `control_guidance_end` has {len(ends)} elements. "
                "Make sure to provide the same number of elements to each list."
            )
        if self.is_multi and len(starts) != len(self.nets):
            raise ValueError(
                f"`control_guidance_start`: {starts} has {len(starts)} elements but there are {len(self.nets)} controlnets available. "
                f"Make sure to provide {len(self.nets)}."
            )
        for start, end in zip(starts, ends):
            if start >= end:
                raise ValueError(f"control guidance start: {start} cannot be larger or equal to control guidance end: {end}.")
            if start < 0.0:
                raise ValueError(f"control guidance start: {start} can't be smaller than 0.")
            if end > 1.0:
                raise ValueError(f"control guidance end: {end} can't be larger than 1.0.")

    @staticmethod
    def _check_image(image: Any, call: Any) -> None:
        if not control_images.kind_ok(image):
            raise TypeError(
                "image must be passed and be one of PIL image, numpy array, torch tensor, list of PIL images, list of numpy arrays "
                f"or list of torch tensors, but is {type(image)}"
            )
        image_batch = control_images.batch_size(image)
        if isinstance(call.prompt, str):
            prompt_batch = 1
        elif isinstance(call.prompt, list):
            prompt_batch = len(call.prompt)
        else:
            prompt_batch = call.prompt_embeds.shape[0]
        if image_batch != 1 and image_batch != prompt_batch:
            raise ValueError(
                "If image batch size is not 1, image batch size must be same as prompt batch size. "
                f"image batch size: {image_batch}, prompt batch size: {prompt_batch}"
            )

    # -- the loop --------------------------------------------------------------------------------
    def prepare(self, pipeline: Any, call: Any, conditioning: Any, device: torch.device, dtype: torch.dtype) -> None:
        controlnet = unwrap(pipeline.controlnet)
        guess_mode = bool(call.guess_mode or self.nets[0].config.global_pool_conditions)
        guidance = bool(call.do_classifier_free_guidance)
        batch = pipeline.batch_size(call) * call.num_images_per_prompt
        prepared = []
        for image in self._images_per_net(call):
            tensor = control_images.preprocess(image, call.height, call.width)
            tensor = tensor.repeat_interleave(batch if tensor.shape[0] == 1 else call.num_images_per_prompt, dim=0)
            tensor = tensor.to(device=device, dtype=controlnet.dtype)
            if guidance and not guess_mode:
                tensor = torch.cat([tensor] * 2)
            prepared.append(tensor)
        scale = call.controlnet_conditioning_scale
        if self.is_multi and not isinstance(scale, list | tuple):
            scale = [scale] * len(self.nets)
        starts, ends = self._window(call)
        call.controlnet_state = SimpleNamespace(
            images=prepared if self.is_multi else prepared[0],
            scale=scale,
            starts=starts,
            ends=ends,
            guess_mode=guess_mode,
            split=guess_mode and guidance,  # the net sees only the conditional half
        )

    def step_inputs(
        self, pipeline: Any, call: Any, step: int, timestep: torch.Tensor, model_input: torch.Tensor, conditioning: Any
    ) -> dict[str, Any]:
        state = call.controlnet_state
        count = pipeline.num_timesteps
        keep = [1.0 - float(step / count < start or (step + 1) / count > end) for start, end in zip(state.starts, state.ends)]
        if self.is_multi:
            scale: Any = [s * k for s, k in zip(state.scale, keep)]
        else:
            scale = (state.scale[0] if isinstance(state.scale, list | tuple) else state.scale) * keep[0]

        hidden = conditioning.encoder_hidden_states
        added = _added_conditioning(conditioning.added_cond_kwargs)
        if state.split:
            model_input = model_input.chunk(2)[1]
            hidden = hidden.chunk(2)[1]
            added = {k: v.chunk(2)[1] for k, v in added.items()} if added is not None else None
        arguments = dict(
            sample=model_input,
            timestep=timestep,
            encoder_hidden_states=hidden,
            controlnet_cond=state.images,
            conditioning_scale=scale,
            guess_mode=state.guess_mode,
            added_cond_kwargs=added,
            return_dict=False,
        )
        if self.runs_in_unet:  # the UNet makes the call inside its own
            return {NET_CALL: {"arguments": arguments, "split": state.split}}
        return self.residuals(pipeline.controlnet, arguments, state.split)

    @staticmethod
    def residuals(net: Any, arguments: dict[str, Any], split: bool) -> dict[str, Any]:
        """The UNet's residual arguments from a call of ``net`` (the module, or its forward) with ``arguments``."""
        down, mid = net(**arguments)
        if split:  # nothing added to the unconditional half
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def _added_conditioning(added: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """SDXL's ``text_embeds`` / ``time_ids`` for the net (None for families without added conditioning)."""
    if not added:
        return None
    return {k: added[k] for k in ("text_embeds", "time_ids") if k in added}


class _Attach:
    """``factory(value, pipeline)`` of the conditioner hook, with the run-config helpers the runner calls."""

    def __call__(self, value: Any, pipeline: Any) -> ControlNetConditioner:
        if isinstance(value, list | tuple):
            value = MultiControlNetModel(list(value))
        if not isinstance(unwrap(value), ControlNetModel | MultiControlNetModel):
            raise TypeError(f"controlnet= takes a ControlNetModel or a list of them, not {type(value).__name__}")
        pipeline.controlnet = value
        return ControlNetConditioner(pipeline)

    @staticmethod
    def load_argument(value: Any, dtype: torch.dtype | None = None) -> Any:
        """``controlnet=PATH`` (or a list of paths / Hub ids) in a run config -> loaded net(s)."""
        if isinstance(value, list | tuple):
            return [_Attach.load_argument(v, dtype) for v in value]
        if isinstance(value, torch.nn.Module):
            return value
        return ControlNetModel.from_pretrained(str(value), torch_dtype=dtype)

    @staticmethod
    def call_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
        """Config values -> call arguments: ``image=PATH`` (or a list) opened as RGB PIL images, integer scales as floats."""
        arguments = dict(arguments)
        if "image" in arguments:
            arguments["image"] = _open_images(arguments["image"])
        scale = arguments.get("controlnet_conditioning_scale")
        if isinstance(scale, int) and not isinstance(scale, bool):
            arguments["controlnet_conditioning_scale"] = float(scale)
        elif isinstance(scale, list):
            arguments["controlnet_conditioning_scale"] = [float(s) for s in scale]
        return arguments


def _open_images(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_open_images(v) for v in value]
    if isinstance(value, str | Path):
        import PIL.Image
        import PIL.ImageOps

        path = Path(value).expanduser()
        if not path.is_file():
            from gesso.config import ConfigError

            raise ConfigError(f"image: file {path} does not exist")
        with PIL.Image.open(path) as opened:
            return PIL.ImageOps.exif_transpose(opened).convert("RGB")
    return value


attach = _Attach()
