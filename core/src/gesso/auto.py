"""``AutoPipelineForText2Image``: pick the family's pipeline from a checkpoint, through the plugins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gesso.loading import read_model_index, resolve_pipeline
from gesso.plugins import get_host

_HUB_OPTIONS = ("revision", "cache_dir", "local_files_only", "token")


class AutoPipelineForText2Image:
    """Loads any installed family's text-to-image pipeline, as the reference's class of that name does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(f"{type(self).__name__} is designed to be instantiated using `{type(self).__name__}.from_pretrained(...)`")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, family: str | None = None, **kwargs: Any) -> Any:
        """Resolve the checkpoint, ask the plugins which family claims it, and load that pipeline.

        ``family=`` overrides detection. Keyword arguments that a conditioner plugin claims
        (``controlnet=``) attach that conditioner; the rest go to the family's ``from_pretrained``.
        """
        registry = get_host().registry
        hub = {k: kwargs[k] for k in _HUB_OPTIONS if k in kwargs}
        loading = {k: kwargs[k] for k in ("variant", "use_safetensors") if k in kwargs}
        folder = resolve_pipeline(pretrained_model_name_or_path, **hub, **loading)
        model_family = registry.detect_family(read_model_index(folder), family)
        attachments = {}
        for spec in registry.conditioners.values():
            if spec.pipeline_argument in kwargs:
                value = kwargs.pop(spec.pipeline_argument)
                if value is None:
                    continue
                if model_family.name not in spec.families:
                    raise ValueError(f"{spec.pipeline_argument}= applies to families {', '.join(spec.families)}, not {model_family.name!r}")
                attachments[spec.name] = (spec, value)  # by name: a spec holds a dict, so is unhashable
        for key in _HUB_OPTIONS:
            kwargs.pop(key, None)
        pipeline = model_family.pipeline_class().from_folder(folder, **kwargs)
        pipeline.name_or_path = str(pretrained_model_name_or_path)
        for spec, value in attachments.values():
            pipeline.conditioners.append(spec.load_factory()(value, pipeline))
        if kwargs.get("device_map") is not None:  # a ControlNet passed in goes where the pipeline was loaded
            from gesso.modeling import device_from_map

            device = device_from_map(kwargs["device_map"])
            for conditioner in pipeline.conditioners:
                for module in conditioner.modules().values():
                    module.to(device)
        return pipeline


class ControlNetModel:
    """The ControlNet model class of whichever installed plugin provides it (gesso-controlnet)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError("ControlNetModel is designed to be instantiated using `ControlNetModel.from_pretrained(...)`")

    @classmethod
    def implementation(cls) -> type:
        component = get_host().registry.components.get(("diffusers", "ControlNetModel"))
        if component is None:
            raise ImportError("ControlNetModel is provided by the gesso-controlnet plugin, which is not installed")
        return component.load_class()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        return cls.implementation().from_pretrained(*args, **kwargs)
