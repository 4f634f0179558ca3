"""CLIP text and vision encoders that read and write the published (transformers) layout.

The checkpoints Stable Diffusion pipelines ship (``text_encoder``, ``image_encoder``, the safety
checker's vision tower) are transformers CLIP models. Importing transformers' classes costs seconds
per process; these modules need only torch, so a new process reaches its first image sooner. The
state-dict keys, ``config.json`` fields and outputs are transformers', so files load unchanged in
either direction and code written against transformers' outputs keeps working.

Both towers are the same pre-LayerNorm transformer; they differ in their embeddings (tokens plus
positions, or image patches plus a class token), the text tower's causal mask, and how one vector is
pooled from the sequence.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from gesso.configuration import ConfigFileError, ConfigMixin
from gesso.modeling import PretrainedModule, device_from_map, parse_size
from gesso.nn.embeddings import embedding, standard_normal
from gesso.weights import check_state_dict, find_weight_files, read_state_dict, save_state_dict

C = TypeVar("C", bound="_EncoderConfig")
M = TypeVar("M", bound="CLIPPreTrainedModel")

#: ``config.json`` keys that describe the file rather than the model; ``save_pretrained`` writes them afresh.
_FILE_KEYS = frozenset({"model_type", "architectures", "dtype", "torch_dtype", "_name_or_path"})

#: The top-level parts of a full CLIP checkpoint; a model ignores those it does not have, so one
#: tower loads from a checkpoint holding both (as transformers allows).
_CLIP_PARTS = frozenset({"text_model", "vision_model", "text_projection", "visual_projection", "logit_scale"})


# --- configuration ---------------------------------------------------------------------------------


class _EncoderConfig:
    """A CLIP tower's ``config.json``: fields with transformers' defaults, unknown keys kept.

    Unknown keys become attributes too and are written back by :meth:`to_dict`, so a checkpoint's
    extra settings (``use_attention_mask``, ``transformers_version``) survive a save. A key that is
    neither a field nor in the file is absent, so ``getattr(config, key, default)`` reads the default.
    """

    model_type: ClassVar[str]
    #: Where a full ``CLIPConfig`` (model_type ``clip``) nests this tower's settings.
    nested_key: ClassVar[str]

    hidden_size: int
    intermediate_size: int
    projection_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str
    layer_norm_eps: float
    attention_dropout: float
    initializer_range: float
    initializer_factor: float

    def __init__(self, **values: Any) -> None:
        for name, default in self._defaults().items():
            setattr(self, name, default)
        for name, value in values.items():
            setattr(self, name, value)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}")
        activation(self.hidden_act)  # an unsupported one is refused with the config, not when the model is built

    @classmethod
    def _defaults(cls) -> dict[str, Any]:
        return {name: getattr(cls, name) for name in vars(cls).get("__annotations__", {}) if hasattr(cls, name)}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Read a tower's config, or take the tower's part out of a full ``CLIPConfig``.

        In a full config the tower's ``projection_dim`` falls back to the top-level one (the size of
        that checkpoint's projection weights) rather than to the class default.
        """
        if data.get("model_type") == "clip" or cls.nested_key in data:
            nested = dict(data.get(cls.nested_key) or {})
            if "projection_dim" not in nested and "projection_dim" in data:
                nested["projection_dim"] = data["projection_dim"]
            data = nested
        return cls(**{k: v for k, v in data.items() if k not in _FILE_KEYS})

    @classmethod
    def from_pretrained(cls: type[C], pretrained_model_name_or_path: str | Path, subfolder: str | None = None, **hub_options: Any) -> C:
        """Read ``config.json`` from a local folder or a Hub repository."""
        from gesso.loading import resolve_component_folder

        folder = resolve_component_folder(pretrained_model_name_or_path, subfolder, **hub_options)
        return cls.from_dict(ConfigMixin.load_config(folder))

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.model_type, **vars(self)}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)}"


class CLIPTextConfig(_EncoderConfig):
    """The text tower's settings; defaults are transformers' (those of ``openai/clip-vit-base-patch32``).

    ``eos_token_id == 2`` marks configs written before transformers fixed the token ids; such
    models pool at the highest token id instead (see :meth:`CLIPTextTransformer.pool`).
    """

    model_type = "clip_text_model"
    nested_key = "text_config"

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407


class CLIPVisionConfig(_EncoderConfig):
    """The vision tower's settings; defaults are transformers' (those of ``openai/clip-vit-base-patch32``)."""

    model_type = "clip_vision_model"
    nested_key = "vision_config"

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0


# --- outputs ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class _ModelOutput:
    """Fields by attribute, by name (``out["pooler_output"]``) or by position (``out[0]``).

    As in transformers' outputs, positions and names count only the fields that are set, so
    ``out[1]`` is the pooled output whether or not hidden states were asked for.
    """

    def _present(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            return self._present()[key]
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._present())

    def __len__(self) -> int:
        return len(self._present())

    def __contains__(self, key: object) -> bool:
        return key in self._present()

    def keys(self) -> list[str]:
        return list(self._present())

    def values(self) -> list[Any]:
        return list(self._present().values())

    def items(self) -> list[tuple[str, Any]]:
        return list(self._present().items())

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self._present().values())


@dataclass(eq=False)
class BaseModelOutputWithPooling(_ModelOutput):
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass(eq=False)
class CLIPTextModelOutput(_ModelOutput):
    text_embeds: torch.Tensor
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass(eq=False)
class CLIPVisionModelOutput(_ModelOutput):
    image_embeds: torch.Tensor
    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


# --- the shared transformer ------------------------------------------------------------------------


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU the original CLIP models were trained with."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"hidden_act {name!r} is not supported; expected one of {', '.join(sorted(_ACTIVATIONS))}") from None


class CLIPAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """``mask`` (boolean, True = attend) broadcasts to (batch, heads, queries, keys); ``causal``
        without a mask lets the attention kernel apply the causal pattern itself.

        A query the mask leaves nothing to attend to (a padding token before every real one, as
        with left padding) gets a zero attention output, which is what transformers' default
        attention gives on the CPU and in float32. The kernel itself is handed a mask that lets such
        a row attend everywhere: for an empty row, older torch releases return NaN and the float16
        CUDA kernels arbitrary values, so the row would otherwise depend on the backend.
        """
        batch, length, width = x.shape
        head_dim = width // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        attends = None
        if mask is not None:
            attends = mask.any(-1, keepdim=True)
            mask = mask | ~attends
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=head_dim**-0.5)
        if attends is not None:
            out = out * attends
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.activation = activation(hidden_act)
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: attention, then the MLP, each on a normalised copy."""

    def __init__(self, config: _EncoderConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask, causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: _EncoderConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The last layer's output, and (if asked) the input followed by every layer's output."""
        states = [x]
        for layer in self.layers:
            x = layer(x, mask, causal)
            states.append(x)
        return x, tuple(states) if output_hidden_states else None


# --- the towers ------------------------------------------------------------------------------------


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids.shape[-1]
        limit = self.position_embedding.num_embeddings
        if length > limit:
            raise ValueError(f"input_ids hold {length} tokens, more than the {limit} positions the model has")
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device)[None]
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


class CLIPTextTransformer(nn.Module):
    """The text tower: the module under ``text_model`` in every published checkpoint."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.eos_token_id = config.eos_token_id
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> BaseModelOutputWithPooling:
        input_ids = input_ids.reshape(-1, input_ids.shape[-1])
        x = self.embeddings(input_ids, position_ids)
        mask = None if attention_mask is None else causal_padding_mask(attention_mask.reshape(input_ids.shape))
        x, hidden_states = self.encoder(x, mask, causal=True, output_hidden_states=output_hidden_states)
        last = self.final_layer_norm(x)
        return BaseModelOutputWithPooling(last, self.pool(last, input_ids), hidden_states)

    def pool(self, last_hidden_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The hidden state at each sequence's end-of-text token.

        Configs with the pre-fix ``eos_token_id == 2`` find it as the highest id (true of CLIP's own
        vocabulary, where end-of-text is the last entry); others find the first ``eos_token_id``,
        which stays right when tokens are added to the vocabulary or padding uses the same id.
        """
        ids = input_ids.to(last_hidden_state.device)
        positions = ids.argmax(-1) if self.eos_token_id == 2 else (ids == self.eos_token_id).int().argmax(-1)
        return last_hidden_state[torch.arange(ids.shape[0], device=ids.device), positions]


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, length) padding mask (1 = token) -> (batch, 1, length, length) boolean mask: each
    token attends to itself and earlier tokens, never to padding."""
    length = attention_mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    return causal & attention_mask.bool()[:, None, None, :]


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(standard_normal(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.position_embedding = embedding((config.image_size // config.patch_size) ** 2 + 1, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if height != self.image_size or width != self.image_size:
            raise ValueError(f"pixel_values are {height}x{width}, but the model takes {self.image_size}x{self.image_size} images")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        class_token = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([class_token, patches], dim=1) + self.position_embedding.weight

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}"


class CLIPVisionTransformer(nn.Module):
    """The vision tower: the module under ``vision_model`` in every published checkpoint."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: the published key
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> BaseModelOutputWithPooling:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        x, hidden_states = self.encoder(x, output_hidden_states=output_hidden_states)
        return BaseModelOutputWithPooling(x, self.post_layernorm(x[:, 0]), hidden_states)


# --- loading and saving ----------------------------------------------------------------------------


class CLIPPreTrainedModel(PretrainedModule):
    """``from_pretrained``/``save_pretrained`` in transformers' layout, through gesso's weight readers.

    The model is built on the meta device and the file's tensors are assigned in place: no time
    spent on random initialisation, and one copy of the weights in memory. Pipelines save these
    classes under the library ``transformers``, whose classes of the same names read the files.
    Other models in the same layout (the SD safety checker) subclass it with their own
    ``config_class`` and, where their keys differ, :meth:`_own_tensors`.
    """

    model_index_library = "transformers"
    #: Reads ``config.json`` (``from_dict(mapping)``) and writes it back (``to_dict()``).
    config_class: ClassVar[type[Any]]
    #: The attribute holding the tower; every key of the tower sits under it in published files.
    tower: ClassVar[str]

    def __init__(self, config: Any) -> None:
        super().__init__()
        self._config = self._as_config(config)

    @classmethod
    def _as_config(cls, config: Any) -> Any:
        """Our config as is; a mapping or another library's config object (anything with ``to_dict``) converted."""
        if isinstance(config, cls.config_class):
            return config
        return cls.config_class.from_dict(config if isinstance(config, Mapping) else config.to_dict())

    @property
    def config(self) -> Any:
        return self._config

    @classmethod
    def from_pretrained(
        cls: type[M],
        pretrained_model_name_or_path: str | Path,
        *,
        subfolder: str | None = None,
        config: Any = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        device_map: str | torch.device | None = None,
        **hub_options: Any,
    ) -> M:
        """Load from a local folder or a Hub repository in transformers' layout.

        ``dtype`` (or its older name ``torch_dtype``) casts floating-point weights as they are read;
        the default is float32 and ``"auto"`` keeps the file's. ``device_map`` (one device, such as
        ``"cuda"``) places the weights there straight from the files. ``hub_options`` are
        ``cache_dir``, ``revision``, ``local_files_only`` and ``token``.
        """
        from gesso.loading import resolve_component_folder

        folder = resolve_component_folder(pretrained_model_name_or_path, subfolder, variant=variant, **hub_options)
        if config is None:
            data = ConfigMixin.load_config(folder)
            try:
                config = cls.config_class.from_dict(data)
            except (TypeError, ValueError) as err:
                raise ConfigFileError(f"{folder / ConfigMixin.config_name}: {err}") from None
        files = find_weight_files(folder, "model", variant, use_safetensors)
        return cls.from_config_and_files(
            config, files, _float_dtype(dtype if dtype is not None else torch_dtype), device_from_map(device_map)
        )

    @classmethod
    def from_config_and_files(
        cls: type[M],
        config: Any,
        files: list[Path],
        float_dtype: torch.dtype | None = torch.float32,
        device: torch.device | None = None,
    ) -> M:
        """Build the model on the meta device and assign the files' tensors (cast to ``float_dtype``; None keeps the files')."""
        with torch.device("meta"):
            model = cls(config)
        state = model._own_tensors(read_state_dict(files, device or "cpu", float_dtype=float_dtype))
        check_state_dict(model, state, str(files[0]) if len(files) == 1 else f"{files[0].parent} (sharded)")
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def _own_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A file's tensors under this model's key names.

        transformers 5 writes a bare ``CLIPTextModel``/``CLIPVisionModel`` without the tower prefix
        (``embeddings.…`` for ``text_model.embeddings.…``); such keys get the prefix back. Stale
        ``position_ids`` buffers of older files, and the parts of a full CLIP checkpoint this model
        does not have (the other tower, its projection, ``logit_scale``), are dropped.
        """
        own_parts = {key.split(".")[0] for key in self.state_dict()}
        if self.tower not in {key.split(".")[0] for key in state}:
            state = {key if key.split(".")[0] in _CLIP_PARTS else f"{self.tower}.{key}": t for key, t in state.items()}
        return {
            key: tensor
            for key, tensor in state.items()
            if not key.endswith(".position_ids") and (key.split(".")[0] in own_parts or key.split(".")[0] not in _CLIP_PARTS)
        }

    def save_pretrained(
        self, save_directory: str | Path, variant: str | None = None, safe_serialization: bool = True, max_shard_size: int | str = "10GB"
    ) -> None:
        """Write ``config.json`` and ``model.safetensors`` (sharded above ``max_shard_size``).

        Keys keep the tower prefix (``text_model.…``), the layout of the published checkpoints, which
        transformers 4 and 5 both load.
        """
        from gesso.output import write_atomic

        if not safe_serialization:
            raise ValueError("save_pretrained writes safetensors only; pickled .bin weights are not written")
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        save_state_dict(self.state_dict(), folder, "model", variant, parse_size(max_shard_size))
        dtype = str(self.dtype).removeprefix("torch.")
        data = {"architectures": [type(self).__name__], **self.config.to_dict(), "dtype": dtype, "torch_dtype": dtype}
        write_atomic((json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), folder / "config.json")


def _float_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """float32 by default, as transformers 4; ``"auto"`` -> None (keep the file's); names such as ``"float16"`` accepted."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype")
    return dtype


class CLIPTextModel(CLIPPreTrainedModel):
    """The text tower alone: per-token hidden states and the pooled end-of-text state."""

    config_class = CLIPTextConfig
    tower = "text_model"

    def __init__(self, config: CLIPTextConfig | Mapping[str, Any]) -> None:
        super().__init__(config)
        self.text_model = CLIPTextTransformer(self.config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> BaseModelOutputWithPooling | tuple[Any, ...]:
        out = self.text_model(input_ids, attention_mask, position_ids, output_hidden_states)
        return out if return_dict else out.to_tuple()


class CLIPTextModelWithProjection(CLIPPreTrainedModel):
    """The text tower and the projection into CLIP's joint text-image space (``text_embeds``)."""

    config_class = CLIPTextConfig
    tower = "text_model"

    def __init__(self, config: CLIPTextConfig | Mapping[str, Any]) -> None:
        super().__init__(config)
        self.text_model = CLIPTextTransformer(self.config)
        self.text_projection = nn.Linear(self.config.hidden_size, self.config.projection_dim, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> CLIPTextModelOutput | tuple[Any, ...]:
        text = self.text_model(input_ids, attention_mask, position_ids, output_hidden_states)
        out = CLIPTextModelOutput(self.text_projection(text.pooler_output), text.last_hidden_state, text.hidden_states)
        return out if return_dict else out.to_tuple()


class CLIPVisionModel(CLIPPreTrainedModel):
    """The vision tower alone: per-patch hidden states (class token first) and the pooled class token."""

    config_class = CLIPVisionConfig
    tower = "vision_model"

    def __init__(self, config: CLIPVisionConfig | Mapping[str, Any]) -> None:
        super().__init__(config)
        self.vision_model = CLIPVisionTransformer(self.config)

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, return_dict: bool = True
    ) -> BaseModelOutputWithPooling | tuple[Any, ...]:
        out = self.vision_model(pixel_values, output_hidden_states)
        return out if return_dict else out.to_tuple()


class CLIPVisionModelWithProjection(CLIPPreTrainedModel):
    """The vision tower and the projection into CLIP's joint text-image space (``image_embeds``)."""

    config_class = CLIPVisionConfig
    tower = "vision_model"

    def __init__(self, config: CLIPVisionConfig | Mapping[str, Any]) -> None:
        super().__init__(config)
        self.vision_model = CLIPVisionTransformer(self.config)
        self.visual_projection = nn.Linear(self.config.hidden_size, self.config.projection_dim, bias=False)

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, return_dict: bool = True
    ) -> CLIPVisionModelOutput | tuple[Any, ...]:
        vision = self.vision_model(pixel_values, output_hidden_states)
        out = CLIPVisionModelOutput(self.visual_projection(vision.pooler_output), vision.last_hidden_state, vision.hidden_states)
        return out if return_dict else out.to_tuple()
