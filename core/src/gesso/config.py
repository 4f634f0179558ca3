"""The run configuration: a structured OmegaConf schema and its merge layers.

Layers, later wins: the core's defaults (:class:`RunConfig`) <- the family plugin's defaults (YAML
shipped in the plugin) <- the user's YAML files <- ``key=value`` overrides. The family's extra call
parameters (``prompt_2``, ``prior_guidance_scale`` ...) and those of conditioners that apply to it
(``controlnet_conditioning_scale`` ...) join the schema, so a misspelt key is refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from gesso.contract import ExecutionPolicy
from gesso.registry import Registry, did_you_mean

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

#: Keys passed to the pipeline call under their own names (families and conditioners add more).
CALL_KEYS = ("prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "height", "width", "num_images_per_prompt")

DTYPES = ("auto", "float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A run configuration is wrong; the message names the key (or file) to fix."""


@dataclass
class OutputConfig:
    dir: str = "outputs"
    write_config: bool = True


@dataclass
class RunConfig:
    """The core schema (Optional values left None take the family's or the pipeline's default)."""

    model: str = DEFAULT_MODEL
    family: Optional[str] = None  # noqa: UP045 - OmegaConf reads typing.Optional
    prompt: Any = None
    negative_prompt: Any = None
    num_inference_steps: Optional[int] = None  # noqa: UP045
    guidance_scale: Optional[float] = None  # noqa: UP045
    height: Optional[int] = None  # noqa: UP045
    width: Optional[int] = None  # noqa: UP045
    num_images_per_prompt: int = 1
    seed: Optional[int] = None  # noqa: UP045
    scheduler: Optional[str] = None  # noqa: UP045
    dtype: str = "auto"
    device: str = "auto"
    variant: Optional[str] = None  # noqa: UP045
    optimizations: list[str] = field(default_factory=list)
    optimization_options: dict[str, Any] = field(default_factory=dict)
    output: OutputConfig = field(default_factory=OutputConfig)


def load_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError and friends: one line naming the file
        raise ConfigError(f"config file {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path}: expected a mapping of keys to values")
    return loaded


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0]]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as err:
        raise ConfigError(f"cannot parse overrides: {str(err).splitlines()[0]}") from None


def user_layers(
    files: Iterable[str | Path] = (), overrides: Sequence[str] = (), mappings: Iterable[Mapping[str, Any]] = ()
) -> list[DictConfig]:
    layers = [OmegaConf.create(dict(m)) for m in mappings]
    layers += [load_yaml(f) for f in files]
    if overrides:
        layers.append(parse_overrides(overrides))
    return layers


def family_defaults(reference: Mapping[str, Any] | str) -> DictConfig:
    """A family's defaults: a mapping, or ``"package:file.yaml"`` shipped inside the plugin."""
    if not isinstance(reference, str):
        return OmegaConf.create(dict(reference))
    from importlib import resources

    package, _, name = reference.partition(":")
    with resources.as_file(resources.files(package) / name) as path:
        return load_yaml(path)


def schema_for(registry: Registry, family_name: str | None) -> DictConfig:
    """The core schema plus the family's and its conditioners' keys, in struct mode."""
    schema = OmegaConf.structured(RunConfig)
    extra: dict[str, Any] = {}
    if family_name and family_name in registry.families:
        extra.update(registry.families[family_name].config_keys)
        for spec in registry.conditioners.values():
            if family_name in spec.families:
                extra.update(spec.config_keys)
                extra.setdefault(spec.pipeline_argument, None)
    OmegaConf.set_struct(schema, False)
    schema = OmegaConf.merge(schema, OmegaConf.create(extra))
    OmegaConf.set_struct(schema, True)
    OmegaConf.set_struct(schema.optimization_options, False)  # keyed by optimization: checked in validate()
    return schema


def peek(layers: list[DictConfig], key: str, default: Any = None) -> Any:
    """A top-level value from the user layers before the schema is known (model, family)."""
    value = default
    for layer in layers:
        if key in layer:
            value = layer[key]
    return value


def build(
    layers: list[DictConfig],
    registry: Registry,
    family_name: str | None,
) -> DictConfig:
    """Merge the layers over the schema for ``family_name``; every error names its key."""
    schema = schema_for(registry, family_name)
    merged = schema
    try:
        if family_name and family_name in registry.families:
            merged = OmegaConf.merge(merged, family_defaults(registry.families[family_name].config_defaults))
        for layer in layers:
            merged = OmegaConf.merge(merged, layer)
    except (oc_errors.ConfigKeyError, oc_errors.ConfigAttributeError) as err:
        raise ConfigError(_unknown_key_message(err, schema)) from None
    except oc_errors.ValidationError as err:
        raise ConfigError(f"{err.full_key}: {_first_line(err)}") from None
    validate(merged, registry)
    return merged


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0]


def _unknown_key_message(err: oc_errors.OmegaConfBaseException, schema: DictConfig) -> str:
    full_key = err.full_key or str(getattr(err, "key", "?"))
    parent_key, _, leaf = full_key.rpartition(".")
    node = OmegaConf.select(schema, parent_key) if parent_key else schema
    choices = list(node.keys()) if isinstance(node, DictConfig) else []
    return f"unknown config key {full_key!r}{did_you_mean(leaf, [str(c) for c in choices])}"


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def validate(config: DictConfig, registry: Registry) -> None:
    """Value checks beyond types, each naming its key."""

    def positive(key: str, multiple: int = 1) -> None:
        value = config.get(key)
        if value is None:
            return
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
        if value % multiple:
            raise ConfigError(f"{key}: must be a multiple of {multiple}, got {value}")

    positive("height", 8)
    positive("width", 8)
    positive("num_inference_steps")
    positive("num_images_per_prompt")
    if config.guidance_scale is not None and config.guidance_scale < 0:
        raise ConfigError(f"guidance_scale: must be 0 or more, got {config.guidance_scale}")
    if config.seed is not None and not 0 <= config.seed < 2**63:
        raise ConfigError(f"seed: must be between 0 and 2**63 - 1, got {config.seed}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    if not _DEVICE.match(str(config.device)):
        raise ConfigError(f"device: must be auto, cpu, mps, cuda or cuda:N, got {config.device!r}")
    if (
        config.scheduler is not None
        and config.scheduler not in registry.scheduler_short_names
        and config.scheduler not in registry.schedulers
    ):
        raise ConfigError(
            f"scheduler: unknown scheduler {config.scheduler!r}{did_you_mean(config.scheduler, registry.scheduler_names())}; "
            f"known: {', '.join(registry.scheduler_names())}"
        )
    for name in config.optimizations:
        if name not in registry.optimizations and name not in presets(registry):
            known = sorted(registry.optimizations) + sorted(presets(registry))
            raise ConfigError(
                f"optimizations: unknown optimization {name!r}{did_you_mean(name, known)}; known: {', '.join(known) or 'none'}"
            )
    check_optimization_options(OmegaConf.to_container(config.optimization_options), list(config.optimizations), registry)
    if config.prompt is not None and not isinstance(config.prompt, str) and not OmegaConf.is_list(config.prompt):
        raise ConfigError(f"prompt: must be a string or a list of strings, got {config.prompt!r}")


def check_optimization_options(options: Mapping[str, Any], names: Sequence[str], registry: Registry) -> None:
    """``optimization_options``: each entry names a chosen optimization (a preset's members count) and
    only options that optimization takes."""
    chosen = {member for name in names for member in presets(registry).get(name, [name])}
    for name, values in options.items():
        key = f"optimization_options.{name}"
        if name not in registry.optimizations:
            raise ConfigError(f"{key}: unknown optimization {name!r}{did_you_mean(name, sorted(registry.optimizations))}")
        if name not in chosen:
            raise ConfigError(f"{key}: optimization {name!r} is not chosen (optimizations: [{', '.join(names)}])")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{key}: must map option names to values, got {values!r}")
        accepted = registry.optimizations[name].options
        for option in values:
            if option not in accepted:
                takes = ", ".join(accepted) or "no options"
                raise ConfigError(f"{key}.{option}: unknown option{did_you_mean(str(option), list(accepted))}; {name!r} takes {takes}")


def presets(registry: Registry, policy: ExecutionPolicy | None = None) -> dict[str, list[str]]:
    """Named sets of optimizations (``fast``): the core's members that are registered, then each
    registered optimization that names the preset in its ``presets``, then (given a family's
    ``policy``) the registered ones its ``preset_members`` adds."""
    from gesso.optimize import PRESETS

    found = {name: [n for n in names if n in registry.optimizations] for name, names in PRESETS.items()}
    additions = [(preset, spec.name) for spec in registry.optimizations.values() for preset in spec.presets]
    if policy is not None:
        additions += [(preset, name) for preset, names in policy.preset_members.items() for name in names if name in registry.optimizations]
    for preset, name in additions:
        members = found.setdefault(preset, [])
        if name not in members:
            members.append(name)
    return found


def call_keys(config: DictConfig, registry: Registry) -> list[str]:
    """The keys of ``config`` passed to the pipeline call."""
    keys = list(CALL_KEYS)
    family = registry.families.get(config.family or "")
    if family is not None:
        keys += list(family.config_keys)
        for spec in registry.conditioners.values():
            # A conditioner's call parameters exist only once it is attached (``controlnet=...``).
            if family.name in spec.families and config.get(spec.pipeline_argument) is not None:
                keys += list(spec.config_keys)
    return keys


def to_yaml(config: DictConfig) -> str:
    return OmegaConf.to_yaml(config, resolve=True)
