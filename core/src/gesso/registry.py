"""What the plugins registered: families, components, schedulers, conditioners, optimizations.

Every name is owned by exactly one plugin: a second registration of the same name is an error that
names both plugins, instead of the last one silently winning.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gesso.contract import Component, ConditionerSpec, ModelFamily, OptimizationSpec, Scheduler

#: Well-known pipelines and the distribution that provides their family, for a helpful error.
KNOWN_PIPELINES = {
    "StableDiffusionPipeline": "gesso-sd15",
    "StableDiffusionXLPipeline": "gesso-sdxl",
    "KandinskyV22Pipeline": "gesso-kandinsky",
    "KandinskyV22CombinedPipeline": "gesso-kandinsky",
    "KandinskyV22PriorPipeline": "gesso-kandinsky",
    "StableDiffusionControlNetPipeline": "gesso-controlnet",
    "StableDiffusionXLControlNetPipeline": "gesso-controlnet",
}


class RegistrationError(ValueError):
    """Two plugins claim one name, or a plugin registered something malformed."""


class FamilyNotFoundError(LookupError):
    """No installed family (or more than one, equally) claims a checkpoint."""


def did_you_mean(name: str, choices: Mapping[str, Any] | list[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class Registry:
    families: dict[str, ModelFamily] = field(default_factory=dict)
    components: dict[tuple[str, str], Component] = field(default_factory=dict)
    schedulers: dict[str, Scheduler] = field(default_factory=dict)
    scheduler_short_names: dict[str, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)
    conditioners: dict[str, ConditionerSpec] = field(default_factory=dict)
    optimizations: dict[str, OptimizationSpec] = field(default_factory=dict)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)

    def _claim(self, kind: str, name: str, plugin: str) -> None:
        owner = self.owners.get((kind, name))
        if owner is not None:
            raise RegistrationError(f"{kind} {name!r} is registered by both plugin {owner!r} and plugin {plugin!r}")
        self.owners[(kind, name)] = plugin

    def add(self, obj: Any, plugin: str) -> None:
        """Record one registered object for ``plugin``; the kind follows from its type."""
        if isinstance(obj, ModelFamily):
            self._claim("family", obj.name, plugin)
            self.families[obj.name] = obj
        elif isinstance(obj, Component):
            self._claim("component", "/".join(obj.key), plugin)
            self.components[obj.key] = obj
        elif isinstance(obj, Scheduler):
            self._claim("scheduler", obj.class_name, plugin)
            for short in obj.short_names:
                self._claim("scheduler", short, plugin)
                self.scheduler_short_names[short] = (obj.class_name, obj.short_names[short])
            self.schedulers[obj.class_name] = obj
        elif isinstance(obj, ConditionerSpec):
            self._claim("conditioner", obj.name, plugin)
            self.conditioners[obj.name] = obj
        elif isinstance(obj, OptimizationSpec):
            self._claim("optimization", obj.name, plugin)
            self.optimizations[obj.name] = obj
        else:
            raise RegistrationError(f"plugin {plugin!r} registered {obj!r}, which is no gesso contract object")

    def owner(self, kind: str, name: str) -> str | None:
        return self.owners.get((kind, name))

    def detect_family(self, model_index: Mapping[str, Any], family: str | None = None) -> ModelFamily:
        """The family for a checkpoint: the named one, else the single best-scoring claimant."""
        if family:
            if family not in self.families:
                known = ", ".join(sorted(self.families)) or "none"
                raise FamilyNotFoundError(f"family {family!r} is not installed{did_you_mean(family, self.families)}; installed: {known}")
            return self.families[family]
        class_name = model_index.get("_class_name", "?")
        scored = sorted(((f.score(model_index), f.name) for f in self.families.values()), reverse=True)
        scored = [(s, n) for s, n in scored if s > 0]
        if not scored:
            hint = f"; install {KNOWN_PIPELINES[class_name]}" if class_name in KNOWN_PIPELINES else ""
            known = ", ".join(sorted(self.families)) or "none"
            raise FamilyNotFoundError(f"no installed family recognises pipeline {class_name!r} (installed: {known}){hint}")
        if len(scored) > 1 and scored[0][0] == scored[1][0]:
            raise FamilyNotFoundError(
                f"families {scored[0][1]!r} and {scored[1][1]!r} both claim pipeline {class_name!r}; name one with family=..."
            )
        return self.families[scored[0][1]]

    def scheduler_class(self, name: str) -> type:
        if name not in self.schedulers:
            raise LookupError(f"unknown scheduler class {name!r}{did_you_mean(name, self.schedulers)}")
        return self.schedulers[name].load_class()

    def make_scheduler(self, name: str, base_config: Mapping[str, Any]) -> Any:
        """Scheduler ``name`` (short or class name) built on a checkpoint's scheduler config.

        The base config's betas, spacing and offset carry over, as with
        ``X.from_config(pipe.scheduler.config, use_karras_sigmas=True)``.
        """
        class_name, overrides = self.scheduler_short_names.get(name, (name, {}))
        if class_name not in self.schedulers:
            raise LookupError(
                f"unknown scheduler {name!r}{did_you_mean(name, self.scheduler_names())}; known: {', '.join(self.scheduler_names())}"
            )
        return self.scheduler_class(class_name).from_config(base_config, **overrides)

    def scheduler_names(self) -> list[str]:
        return sorted(self.scheduler_short_names) + sorted(self.schedulers)
