"""PluginHost: discovers, loads and isolates gesso plugins.

Entry points of the group ``gesso`` are loaded one at a time. A plugin that fails to import, is
built for another gesso version, or raises while registering is recorded with its error and left
out; the other plugins and the CLI go on. Environment variables:

- ``GESSO_LOAD_PLUGINS=a,b``: load only these entry points (an empty value loads none);
- ``GESSO_DISABLE_PLUGINS=a,b``: skip these;
- ``GESSO_STRICT_PLUGINS=1``: re-raise a plugin's failure (for plugin authors).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from gesso import hookspecs
from gesso.registry import Registry

ENTRY_POINT_GROUP = "gesso"
BUILTIN_PLUGINS = ("gesso.builtin",)


class PluginLoadError(RuntimeError):
    """A plugin failed while ``GESSO_STRICT_PLUGINS=1``."""


@dataclass
class PluginInfo:
    name: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    registers: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class PluginFailure:
    name: str
    stage: str  # "import", "register" or "incompatible"
    error: str
    distribution: str | None = None
    details: str = ""


def _names_from_env(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def _strict_from_env() -> bool:
    return os.environ.get("GESSO_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes", "on"}


class PluginHost:
    """One set of loaded plugins and what they registered.

    ``PluginHost()`` loads the built-in plugins and the installed entry points (honouring the
    environment variables); ``PluginHost(entry_points=False)`` loads only the built-ins, and
    ``register(module)`` adds a plugin object by hand (tests, notebooks).
    """

    def __init__(
        self,
        *,
        entry_points: bool = True,
        builtins: bool = True,
        allow: Iterable[str] | None = None,
        deny: Iterable[str] | None = None,
        strict: bool | None = None,
    ) -> None:
        self.manager = pluggy.PluginManager("gesso")
        self.manager.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.plugins: list[PluginInfo] = []
        self.failures: list[PluginFailure] = []
        self.strict = _strict_from_env() if strict is None else strict
        self._allow = set(allow) if allow is not None else _names_from_env("GESSO_LOAD_PLUGINS")
        self._deny = set(deny) if deny is not None else (_names_from_env("GESSO_DISABLE_PLUGINS") or set())
        if builtins:
            import importlib

            for module_name in BUILTIN_PLUGINS:
                self.register(importlib.import_module(module_name), name=module_name, builtin=True)
        if entry_points:
            self.load_entry_points()

    # -- loading -------------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        for entry_point in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if self._allow is not None and entry_point.name not in self._allow:
                continue
            if entry_point.name in self._deny:
                continue
            self._load_entry_point(entry_point)

    def _load_entry_point(self, entry_point: metadata.EntryPoint) -> None:
        dist = entry_point.dist
        dist_name = dist.metadata["Name"] if dist is not None else None
        incompatible = _incompatibility(dist)
        if incompatible:
            self._fail(entry_point.name, "incompatible", incompatible, dist_name, None)
            return
        try:
            plugin = entry_point.load()
        except Exception as err:  # a broken plugin must not take the others down
            self._fail(entry_point.name, "import", f"{type(err).__name__}: {err}", dist_name, err)
            return
        self.register(plugin, name=entry_point.name, distribution=dist_name, version=dist.version if dist else None)

    def register(
        self,
        plugin: ModuleType | object,
        *,
        name: str | None = None,
        distribution: str | None = None,
        version: str | None = None,
        builtin: bool = False,
    ) -> PluginInfo | None:
        """Add one plugin and collect its registrations; on failure nothing of it is kept."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        try:
            self.manager.register(plugin, name=name)
            self.manager.check_pending()
        except Exception as err:
            if self.manager.is_registered(plugin):
                self.manager.unregister(plugin)
            self._fail(name, "register", f"{type(err).__name__}: {err}", distribution, err)
            return None
        collected: list[Any] = []
        try:
            for hook_name in _hook_names():
                for impl in getattr(self.manager.hook, hook_name).get_hookimpls():
                    if impl.plugin is plugin:
                        impl.function(register=collected.append)
            trial = Registry(**{k: dict(v) for k, v in vars(self.registry).items()})
            for obj in collected:
                trial.add(obj, name)
        except Exception as err:
            self.manager.unregister(plugin)
            self._fail(name, "register", f"{type(err).__name__}: {err}", distribution, err)
            return None
        self.registry = trial
        info = PluginInfo(name=name, distribution=distribution, version=version, builtin=builtin)
        for obj in collected:
            kind, label = _describe(obj)
            info.registers.setdefault(kind, []).append(label)
        self.plugins.append(info)
        return info

    def _fail(self, name: str, stage: str, message: str, distribution: str | None, err: BaseException | None) -> None:
        details = "".join(traceback.format_exception(err)) if err is not None else ""
        self.failures.append(PluginFailure(name=name, stage=stage, error=message, distribution=distribution, details=details))
        if self.strict:
            raise PluginLoadError(f"plugin {name!r} failed at {stage}: {message}") from err

    # -- reporting -----------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """A JSON-ready description of plugins, what each registers, and failures."""
        return {
            "hook_api_version": hookspecs.HOOK_API_VERSION,
            "plugins": [vars(p) for p in self.plugins],
            "failures": [{k: v for k, v in vars(f).items() if k != "details"} for f in self.failures],
        }


def _hook_names() -> list[str]:
    return [n for n in dir(hookspecs) if n.startswith("register_") and callable(getattr(hookspecs, n))]


def _describe(obj: Any) -> tuple[str, str]:
    from gesso.contract import Component, ConditionerSpec, ModelFamily, OptimizationSpec, Scheduler

    if isinstance(obj, ModelFamily):
        return "families", obj.name
    if isinstance(obj, Component):
        return "components", "/".join(obj.key)
    if isinstance(obj, Scheduler):
        return "schedulers", obj.class_name
    if isinstance(obj, ConditionerSpec):
        return "conditioners", obj.name
    if isinstance(obj, OptimizationSpec):
        return "optimizations", obj.name
    return "other", repr(obj)


def _incompatibility(dist: metadata.Distribution | None) -> str | None:
    """Why a plugin's declared ``gesso`` requirement excludes the running gesso, if it does."""
    if dist is None:
        return None
    from packaging.requirements import InvalidRequirement, Requirement

    import gesso

    for line in dist.requires or []:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.name.lower() != "gesso" or requirement.marker is not None and "extra" in str(requirement.marker):
            continue
        if requirement.specifier and not requirement.specifier.contains(gesso.__version__, prereleases=True):
            return f"requires gesso{requirement.specifier}, but gesso {gesso.__version__} is installed"
    return None


_default_host: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide host, created on first use (never at import time)."""
    global _default_host
    if _default_host is None:
        _default_host = PluginHost()
    return _default_host


def set_host(host: PluginHost | None) -> None:
    """Replace the process-wide host (tests; a fresh ``PluginHost`` after installing a plugin)."""
    global _default_host
    _default_host = host
