"""The base class of gesso's own models: build from ``config.json``, load weights, save."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from gesso.configuration import ConfigMixin
from gesso.weights import WeightsError, check_state_dict, find_weight_files, read_state_dict, save_state_dict

M = TypeVar("M", bound="ModelMixin")


class PretrainedModule(torch.nn.Module):
    """A module that loads itself by gesso's rules; pipelines load such classes directly.

    Subclasses provide ``from_pretrained(folder, torch_dtype=..., variant=..., use_safetensors=...,
    device_map=...)``: floating-point weights cast to ``torch_dtype`` (float32 when None) and read
    straight onto ``device_map``'s device. A pipeline passes exactly these options; modules of other
    libraries are loaded on the CPU by their own loader and moved afterwards, which is slower.
    """

    #: The ``library`` that ``model_index.json`` names for this class when a pipeline is saved: the
    #: one the reference loads the class from, so the reference reads the pipelines gesso writes.
    model_index_library: ClassVar[str] = "diffusers"

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class ModelMixin(PretrainedModule, ConfigMixin):
    """A ``torch.nn.Module`` built from a config, with the reference's ``from_pretrained`` layout.

    Models are constructed on the meta device and the weights are then assigned in place, so
    loading spends no time on random initialisation and holds one copy of the weights.
    """

    config_name = "config.json"
    weights_base_name = "diffusion_pytorch_model"

    @classmethod
    def from_pretrained(
        cls: type[M],
        pretrained_model_name_or_path: str | Path,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        device_map: str | torch.device | None = None,
        **hub_options: Any,
    ) -> M:
        """Load from a local folder or a Hub repository in the reference layout.

        ``device_map`` (a device such as ``"cuda"``) places the weights there straight from the
        files, faster than loading to the CPU and moving the model. ``hub_options`` are
        ``cache_dir``, ``revision``, ``local_files_only`` and ``token``.
        """
        from gesso.loading import resolve_component_folder

        folder = resolve_component_folder(pretrained_model_name_or_path, subfolder, variant=variant, **hub_options)
        config = cls.load_config(folder)
        files = find_weight_files(folder, cls.weights_base_name, variant, use_safetensors)
        return cls.from_config_and_files(config, files, torch_dtype=torch_dtype, device=device_from_map(device_map))

    @classmethod
    def from_config_and_files(
        cls: type[M], config: dict[str, Any], files: list[Path], torch_dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> M:
        with torch.device("meta"):
            model = cls.from_config(config)
        state = read_state_dict(files, device or "cpu", float_dtype=torch_dtype or torch.float32)
        source = str(files[0]) if len(files) == 1 else f"{files[0].parent} (sharded)"
        check_state_dict(model, state, source)
        model.load_state_dict(state, strict=True, assign=True)
        leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:
            raise WeightsError(f"{source}: {cls.__name__} left {leftover[0]!r} uninitialised")
        return model.eval()

    def save_pretrained(
        self,
        save_directory: str | Path,
        variant: str | None = None,
        safe_serialization: bool = True,
        max_shard_size: int | str = "10GB",
    ) -> None:
        """Write ``config.json`` and safetensors weights (sharded above ``max_shard_size``)."""
        if not safe_serialization:
            raise ValueError("save_pretrained writes safetensors only; pickled .bin weights are not written")
        folder = Path(save_directory)
        self.save_config(folder)
        save_state_dict(self.state_dict(), folder, self.weights_base_name, variant, parse_size(max_shard_size))


def device_from_map(device_map: str | torch.device | None) -> torch.device | None:
    """The one device a ``device_map`` names; gesso places whole components, so the reference's
    placement strategies (``"balanced"``, ``"auto"``) are refused by name."""
    if device_map is None:
        return None
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map={device_map!r} is not supported: pass one device, such as 'cuda' or 'cuda:1'") from None


def parse_size(size: int | str) -> int:
    """``"10GB"`` -> bytes (decimal units, as the reference's ``max_shard_size``)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)
