"""Config-driven runs: resolve a run config, load (or reuse) the pipeline, generate, write PNGs.

``gesso.run(...)`` is what ``gesso generate`` and ``gesso run`` do; the same seed gives the same
image through either, because ``seed=N`` always means ``torch.Generator("cpu").manual_seed(N)``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gesso.config import ConfigError, build, call_keys, check_optimization_options, peek, presets, to_yaml, user_layers
from gesso.plugins import PluginHost, get_host

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    config: DictConfig
    images: list[Any]
    paths: list[Path] = field(default_factory=list)
    nsfw_content_detected: list[bool] | None = None


def resolve_config(
    config: str | Path | Mapping[str, Any] | DictConfig | None = None,
    overrides: Sequence[str] = (),
    *,
    host: PluginHost | None = None,
    files: Iterable[str | Path] = (),
) -> DictConfig:
    """All layers merged for the model's family (detected from its ``model_index.json``)."""
    from gesso.config import DEFAULT_MODEL
    from gesso.loading import read_model_index, resolve_pipeline

    host = host or get_host()
    mappings: list[Mapping[str, Any]] = []
    files = list(files)
    if isinstance(config, str | Path):
        files.insert(0, config)
    elif isinstance(config, DictConfig):
        mappings.append(OmegaConf.to_container(config, resolve=True))  # type: ignore[arg-type]
    elif config is not None:
        mappings.append(config)
    layers = user_layers(files, overrides, mappings)
    family = peek(layers, "family")
    if not family:
        model = peek(layers, "model", DEFAULT_MODEL)
        variant = peek(layers, "variant")
        folder = resolve_pipeline(str(model), variant=variant)
        family = host.registry.detect_family(read_model_index(folder)).name
        layers.append(OmegaConf.create({"family": family}))
    return build(layers, host.registry, family)


def torch_settings(config: DictConfig) -> tuple[Any, Any]:
    """The device and dtype a run uses: float32 on the CPU, float16 on CUDA, unless configured."""
    import torch

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.dtype == "auto":
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    else:
        dtype = getattr(torch, config.dtype)
    return torch.device(device), dtype


class PipelineCache:
    """Keeps the last loaded pipeline, so a batch of runs on one model loads it once."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._pipeline: Any = None

    def get(self, config: DictConfig, host: PluginHost) -> Any:
        device, dtype = torch_settings(config)
        attachments = {
            spec.pipeline_argument: config.get(spec.pipeline_argument)
            for spec in host.registry.conditioners.values()
            if config.get(spec.pipeline_argument) is not None
        }
        key = (
            config.model,
            config.family,
            config.variant,
            str(device),
            str(dtype),
            config.scheduler,
            tuple(config.optimizations),
            repr(OmegaConf.to_container(config.optimization_options)),
            repr(attachments),
        )
        if key != self._key:
            self._pipeline = None
            self._pipeline = load_pipeline(config, host, attachments)
            self._key = key
        return self._pipeline


def load_pipeline(config: DictConfig, host: PluginHost, attachments: Mapping[str, Any] | None = None) -> Any:
    from gesso.auto import AutoPipelineForText2Image

    device, dtype = torch_settings(config)
    prepared = {}
    for name, value in (attachments or {}).items():
        spec = next(s for s in host.registry.conditioners.values() if s.pipeline_argument == name)
        loader = getattr(spec.load_factory(), "load_argument", None)
        prepared[name] = loader(OmegaConf.to_object(value) if OmegaConf.is_config(value) else value, dtype) if loader else value
    pipeline = AutoPipelineForText2Image.from_pretrained(
        config.model, family=config.family, torch_dtype=dtype, variant=config.variant, device_map=device, **prepared
    )
    pipeline.to(device)  # the attached conditioners
    if config.scheduler:
        pipeline.scheduler = host.registry.make_scheduler(config.scheduler, pipeline.scheduler.config)
    apply_optimizations(pipeline, config, host, device)
    return pipeline


def apply_optimizations(pipeline: Any, config: DictConfig, host: PluginHost, device: Any) -> None:
    """The run config's ``optimizations`` and ``optimization_options`` (see :func:`optimize`)."""
    options = OmegaConf.to_container(config.optimization_options)
    optimize(pipeline, list(config.optimizations), host=host, device=device, family=config.family, options=options)


def optimize(
    pipeline: Any,
    names: Sequence[str],
    *,
    host: PluginHost | None = None,
    device: Any = None,
    family: str | None = None,
    policy: Any = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Apply optimizations and presets by name, in their registered order, as a run config does.

    A name given explicitly must support the device and family (else a ConfigError says why); a
    preset (``fast``) means "what of it applies here", so its unsupported members are skipped.
    ``options`` gives an optimization its keyword options (``{"compile": {"mode": ...}}``).
    ``device`` and ``family`` default to the pipeline's, ``policy`` to the family's execution policy.
    """
    import torch

    host = host or get_host()
    options = options or {}
    check_optimization_options(options, names, host.registry)
    family_spec = host.registry.families[family or pipeline.family]
    policy = policy or family_spec.execution_policy
    device_type = torch.device(device if device is not None else pipeline.device).type
    known_presets = presets(host.registry, policy)
    chosen: dict[str, bool] = {}  # name -> named explicitly
    for name in names:
        for member in known_presets.get(name, [name]):
            chosen[member] = chosen.get(member, False) or name not in known_presets
    for name in sorted(chosen, key=lambda n: host.registry.optimizations[n].order):
        spec = host.registry.optimizations[name]
        reason = spec.supports(family_spec.name, device_type)
        if reason and chosen[name]:
            raise ConfigError(f"optimizations: {reason}")
        if reason:
            logger.info("preset member %s skipped: %s", name, reason)
            continue
        try:
            spec.load_apply()(pipeline, policy, **options.get(name, {}))
        except ConfigError as err:  # an option's value (a compile mode) that the optimization refuses
            raise ConfigError(f"optimization_options.{name}: {err}" if name in options else f"optimizations: {name}: {err}") from None


def call_arguments(config: DictConfig, host: PluginHost) -> dict[str, Any]:
    """The pipeline keyword arguments a config holds (None means the pipeline's default)."""
    arguments = {}
    for key in call_keys(config, host.registry):
        value = config.get(key)
        if value is None:
            continue
        arguments[key] = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
    for spec in host.registry.conditioners.values():
        prepare = getattr(spec.load_factory(), "call_arguments", None) if config.get(spec.pipeline_argument) is not None else None
        if prepare is not None:
            arguments = prepare(arguments)
    return arguments


def with_seed(config: DictConfig) -> DictConfig:
    """A copy with a concrete seed: a random one when none was given, recorded so it can be replayed."""
    if config.seed is not None:
        return config
    config = config.copy()
    config.seed = random.SystemRandom().randrange(2**32)
    return config


def run(
    config: str | Path | Mapping[str, Any] | DictConfig | None = None,
    overrides: Sequence[str] = (),
    *,
    host: PluginHost | None = None,
    cache: PipelineCache | None = None,
    progress: bool = False,
    write: bool = True,
) -> RunResult:
    """Generate the images a run config describes and (with ``write``) save them under ``output.dir``."""
    import torch

    from gesso.output import next_free_index, write_png, write_text

    host = host or get_host()
    resolved = with_seed(resolve_config(config, overrides, host=host))
    pipeline = (cache or PipelineCache()).get(resolved, host)
    pipeline.set_progress_bar_config(disable=not progress, desc="steps", leave=False)
    arguments = call_arguments(resolved, host)
    result = pipeline(**arguments, generator=torch.Generator("cpu").manual_seed(int(resolved.seed)))
    images = list(result.images)
    run_result = RunResult(config=resolved, images=images, nsfw_content_detected=result.nsfw_content_detected)
    if not write:
        return run_result
    folder = Path(resolved.output.dir)
    folder.mkdir(parents=True, exist_ok=True)
    start = next_free_index(folder)
    for offset, (image, chunks) in enumerate(zip(images, metadata_chunks(resolved, pipeline, images), strict=True)):
        run_result.paths.append(write_png(image, folder / f"{start + offset:05d}.png", chunks))
    yaml_text = to_yaml(resolved)
    if resolved.output.write_config:
        write_text(yaml_text, folder / f"{start:05d}.yaml")
    return run_result


def metadata_chunks(resolved: DictConfig, pipeline: Any, images: Sequence[Any]) -> list[dict[str, str]]:
    """The PNG text chunks of each image of one run: ``parameters`` (AUTOMATIC1111) and ``gesso`` (the config)."""
    from gesso.output import a1111_parameters

    yaml_text = to_yaml(resolved)
    current = getattr(pipeline, "scheduler", None)
    scheduler = resolved.scheduler or (type(current).__name__ if current is not None else "")
    values = {**OmegaConf.to_container(resolved, resolve=True), "height": images[0].height, "width": images[0].width}  # type: ignore[dict-item]
    values.setdefault("num_inference_steps", pipeline.default_num_inference_steps)
    values["num_inference_steps"] = values["num_inference_steps"] or pipeline.default_num_inference_steps
    values["guidance_scale"] = values["guidance_scale"] if values["guidance_scale"] is not None else pipeline.default_guidance_scale
    return [{"parameters": a1111_parameters(values, scheduler, len(images), offset), "gesso": yaml_text} for offset in range(len(images))]
