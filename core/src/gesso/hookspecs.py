"""The plugin contract: every hook a gesso plugin may implement.

Each hook receives a ``register`` callback; the plugin calls it once per object it provides and
the core validates and de-duplicates. ``docs/plugin-hooks.md`` documents each hook at length.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from gesso.contract import Component, ConditionerSpec, ModelFamily, OptimizationSpec, Scheduler

#: The version of this contract; bumped on an incompatible change (see docs/plugin-hooks.md).
HOOK_API_VERSION = 1


class GessoDeprecationWarning(DeprecationWarning):
    """A hook, hook argument or contract field a plugin uses is deprecated (docs/writing-plugins.md).

    Hooks are deprecated through pluggy's ``@hookspec(warn_on_impl=GessoDeprecationWarning(...))``
    and arguments through ``warn_on_impl_args``: the warning is raised when the plugin registers.
    """


hookspec = pluggy.HookspecMarker("gesso")
hookimpl = pluggy.HookimplMarker("gesso")


@hookspec
def register_families(register: Callable[[ModelFamily], None]) -> None:
    """Register model families: how a checkpoint is recognised, its pipeline, defaults and GPU policy."""


@hookspec
def register_components(register: Callable[[Component], None]) -> None:
    """Register the classes that load the ``["library", "ClassName"]`` pairs of ``model_index.json``."""


@hookspec
def register_schedulers(register: Callable[[Scheduler], None]) -> None:
    """Register scheduler classes under their class names, with short names for configs and the CLI."""


@hookspec
def register_conditioners(register: Callable[[ConditionerSpec], None]) -> None:
    """Register conditioners: extra conditioning applied to other families' pipelines."""


@hookspec
def register_optimizations(register: Callable[[OptimizationSpec], None]) -> None:
    """Register GPU optimizations, each saying which devices and families it supports."""
