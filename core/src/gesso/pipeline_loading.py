"""``DiffusionPipeline``: a set of named components loaded from a folder in the reference layout.

``model_index.json`` names each component's ``[library, ClassName]``; the registry maps that pair to
the class that loads it: gesso's own models (the UNet, the VAE, the CLIP encoders, tokenizer and
image processor of ``gesso.clip``), schedulers, or another library's class a plugin registers.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from gesso.loading import component_names, read_model_index, resolve_pipeline

logger = logging.getLogger(__name__)
P = TypeVar("P", bound="DiffusionPipeline")

_HUB_OPTIONS = ("revision", "cache_dir", "local_files_only", "token")


class ComponentLoadError(ValueError):
    """A component of a pipeline folder cannot be loaded; the message names it."""


class DiffusionPipeline:
    """A family's pipeline: components as attributes, ``from_pretrained``, ``to``, ``save_pretrained``.

    Subclasses set ``family`` and ``expected_components`` (required names) and
    ``optional_components`` (may be absent or ``None``).
    """

    family: ClassVar[str] = ""
    expected_components: ClassVar[tuple[str, ...]] = ()
    optional_components: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **components: Any) -> None:
        missing = [n for n in self.expected_components if n not in components]
        if missing:
            raise TypeError(f"{type(self).__name__} needs component {missing[0]!r}")
        self._component_names = [*components]
        for name, value in components.items():
            setattr(self, name, value)
        for name in self.optional_components:
            if not hasattr(self, name):
                setattr(self, name, None)
                self._component_names.append(name)
        self.conditioners: list[Any] = []
        self._progress_bar_config: dict[str, Any] = {}

    # -- components ------------------------------------------------------------------------------
    @property
    def components(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._component_names}

    def modules(self) -> Iterator[tuple[str, torch.nn.Module]]:
        for name, value in self.components.items():
            if isinstance(value, torch.nn.Module):
                yield name, value

    @property
    def device(self) -> torch.device:
        """Where the loop runs: the first module's device, or the offload target once offloading."""
        if getattr(self, "_execution_device", None) is not None:
            return self._execution_device
        for _, module in self.modules():
            for param in module.parameters():
                return param.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for _, module in self.modules():
            for param in module.parameters():
                return param.dtype
        return torch.float32

    def to(self: P, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> P:
        """Move every module to ``device`` (and cast to ``dtype``, within the family's float32 rules)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        keep_fp32 = set(self.execution_policy().float32_components)
        for name, module in self.modules():
            target_dtype = None if (dtype is None or name in keep_fp32) else dtype
            module.to(device=device, dtype=target_dtype)
        for conditioner in getattr(self, "conditioners", []):  # attached ControlNets and the like
            for module in conditioner.modules().values():
                module.to(device=device, dtype=dtype)
        return self

    @classmethod
    def execution_policy(cls) -> Any:
        from gesso.plugins import get_host

        family = get_host().registry.families.get(cls.family)
        from gesso.contract import ExecutionPolicy

        return family.execution_policy if family else ExecutionPolicy()

    # -- progress --------------------------------------------------------------------------------
    def set_progress_bar_config(self, **options: Any) -> None:
        self._progress_bar_config = options

    def progress_bar(self, iterable: Iterable[Any], total: int | None = None) -> Iterable[Any]:
        from tqdm.auto import tqdm

        options = {"disable": True, **self._progress_bar_config}
        return tqdm(iterable, total=total, **options)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls: type[P],
        pretrained_model_name_or_path: str | Path,
        *,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        device_map: str | torch.device | None = None,
        **kwargs: Any,
    ) -> P:
        """Load every component named in ``model_index.json``; keyword components replace them.

        ``device_map`` (one device, such as ``"cuda"``) loads the components onto it, gesso's models
        straight from their files: faster than ``from_pretrained(...).to("cuda")``.
        """
        hub = {k: kwargs.pop(k) for k in _HUB_OPTIONS if k in kwargs}
        folder = resolve_pipeline(pretrained_model_name_or_path, variant=variant, use_safetensors=use_safetensors, **hub)
        return cls.from_folder(
            folder, torch_dtype=torch_dtype, variant=variant, use_safetensors=use_safetensors, device_map=device_map, **kwargs
        )

    @classmethod
    def from_folder(
        cls: type[P],
        folder: Path,
        *,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        device_map: str | torch.device | None = None,
        **overrides: Any,
    ) -> P:
        from gesso.modeling import device_from_map
        from gesso.plugins import get_host

        device = device_from_map(device_map)
        index = read_model_index(folder)
        registry = get_host().registry
        components: dict[str, Any] = {}
        for name in component_names(index):
            if name in overrides:
                components[name] = overrides.pop(name)
                continue
            library, class_name = index[name]
            if library is None or class_name is None:
                components[name] = None
                continue
            components[name] = load_component(registry, folder, name, library, class_name, torch_dtype, variant, use_safetensors, device)
        unknown = [k for k in overrides if k not in cls.expected_components + cls.optional_components]
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained() got an unexpected keyword argument {unknown[0]!r}")
        components.update(overrides)
        pipeline = cls(**components)
        pipeline.name_or_path = str(folder)
        return pipeline

    def save_pretrained(self, save_directory: str | Path, variant: str | None = None) -> None:
        """Write ``model_index.json`` and each component into its sub-folder."""
        from gesso import __version__

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        index: dict[str, Any] = {"_class_name": self.pipeline_class_name(), "_gesso_version": __version__}
        for name, value in self.components.items():
            if value is None:
                index[name] = [None, None]
                continue
            index[name] = [library_of(value), type(value).__name__]
            if isinstance(value, torch.nn.Module) and "variant" in _parameters(value.save_pretrained):
                value.save_pretrained(folder / name, variant=variant)
            else:
                value.save_pretrained(folder / name)
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def pipeline_class_name(cls) -> str:
        return cls.__name__


def _parameters(function: Any) -> set[str]:
    import inspect

    return set(inspect.signature(function).parameters)


def library_of(value: Any) -> str:
    """The ``library`` a component is saved under: the reference's names, so its loader reads ours.

    A class may declare it as ``model_index_library`` (gesso's CLIP classes say ``"transformers"``,
    the SD safety checker ``"stable_diffusion"``); otherwise transformers' own objects (passed in by
    a user) are ``"transformers"`` and everything else ``"diffusers"``.
    """
    declared = getattr(type(value), "model_index_library", None)
    if isinstance(declared, str):
        return declared
    return "transformers" if type(value).__module__.split(".")[0] == "transformers" else "diffusers"


def load_component(
    registry: Any,
    folder: Path,
    name: str,
    library: str,
    class_name: str,
    torch_dtype: torch.dtype | None,
    variant: str | None,
    use_safetensors: bool | None,
    device: torch.device | None = None,
) -> Any:
    """Load sub-folder ``name`` with the class registered for ``(library, class_name)`` (modules onto ``device``)."""
    component = registry.components.get((library, class_name))
    if component is None:
        component = next((c for c in registry.components.values() if c.class_name == class_name), None)
    if component is None:
        raise ComponentLoadError(
            f"{folder / 'model_index.json'}: component {name!r} is {library}.{class_name}, which no installed plugin provides"
        )
    cls = component.load_class()
    path = folder / name
    if not path.is_dir():
        raise ComponentLoadError(f"{folder}: component folder {name!r} is missing")
    from gesso.schedulers import SchedulerMixin

    if isinstance(cls, type) and issubclass(cls, SchedulerMixin):
        return cls.from_pretrained(path)
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        return _load_module(cls, path, torch_dtype, variant, use_safetensors, device)
    return cls.from_pretrained(path)


def _load_module(
    cls: type, path: Path, torch_dtype: torch.dtype | None, variant: str | None, use_safetensors: bool | None, device: torch.device | None
) -> Any:
    """gesso's own modules read their weights straight onto ``device``; another library's (a
    transformers model a plugin registers) are loaded on the CPU by that library, then placed."""
    from gesso.modeling import PretrainedModule

    if variant and not any(f".{variant}." in p.name or f".{variant}-" in p.name for p in path.iterdir()):
        logger.info("%s has no %s weights; loading the default ones", path, variant)
        variant = None
    if issubclass(cls, PretrainedModule):
        return cls.from_pretrained(path, torch_dtype=torch_dtype, variant=variant, use_safetensors=use_safetensors, device_map=device)
    # transformers models: they take ``dtype`` (newer) or ``torch_dtype`` (older releases).
    options: dict[str, Any] = {"variant": variant}
    if use_safetensors is not None:
        options["use_safetensors"] = use_safetensors
    dtype_key = "dtype" if "dtype" in _parameters(cls.from_pretrained) or _transformers_takes_dtype() else "torch_dtype"
    options[dtype_key] = torch_dtype or torch.float32
    try:
        module = cls.from_pretrained(path, **options)
    except (OSError, ValueError) as err:
        raise ComponentLoadError(f"{path}: cannot load {cls.__name__} ({str(err).splitlines()[0]})") from None
    return place_on_device(module, path, variant, device) if device is not None else module


def place_on_device(module: torch.nn.Module, path: Path, variant: str | None, device: torch.device) -> torch.nn.Module:
    """Move a module that another library loaded on the CPU onto ``device``, its weights copied
    there straight from its safetensors files where :func:`assign_weights_from_files` can."""
    from gesso.weights import WeightsError, find_weight_files

    if device.type != "cpu" and all(t.device.type == "cpu" for t in module.state_dict().values()):
        with contextlib.suppress(WeightsError):  # no safetensors files: the plain path
            assign_weights_from_files(module, find_weight_files(path, "model", variant, use_safetensors=True), device)
    return module.to(device)  # the rest: non-persistent buffers, or everything if the files did not fit


def assign_weights_from_files(module: torch.nn.Module, files: list[Path], device: torch.device) -> bool:
    """Replace ``module``'s weights with copies on ``device`` read from ``files``, if the files hold
    every tensor of its state dict in the same shapes (extra tensors, such as a stale
    ``position_ids``, are ignored) and no two entries share memory (tied weights stay tied only
    through ``.to``). Returns whether it did."""
    from gesso.weights import read_state_dict

    expected = module.state_dict()
    storages = {t.untyped_storage().data_ptr() for t in expected.values() if t.numel()}
    if len(storages) < len([t for t in expected.values() if t.numel()]):
        return False
    loaded = read_state_dict(files, device)
    if any(key not in loaded or loaded[key].shape != tensor.shape for key, tensor in expected.items()):
        return False
    module.load_state_dict({key: loaded[key].to(tensor.dtype) for key, tensor in expected.items()}, strict=True, assign=True)
    return True


def _transformers_takes_dtype() -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version("4.56")
