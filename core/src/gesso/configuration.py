"""Configuration objects for every configurable component (models and schedulers).

A component's configuration is the set of arguments its ``__init__`` received. It is saved as
``config.json`` (or ``scheduler_config.json``) in the reference on-disk vocabulary, so published
checkpoints load as they are and a component can be rebuilt from ``component.config`` alone.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T", bound="ConfigMixin")


class ConfigFileError(ValueError):
    """A configuration file is missing or unreadable; the message names the file."""


def read_json_object(path: Path, error: type[Exception] = ConfigFileError, required: bool = True) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` if the file is absent and not ``required``.

    Every failure (missing, unreadable, not JSON, not an object) is one ``error`` naming the file.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise error(f"{path}: missing") from None
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{path}: cannot be read ({err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


class FrozenConfig(dict):
    """A read-only mapping whose keys are also attributes (``unet.config.sample_size``).

    Read-only because a component's configuration describes how it was built: changing it after the
    fact would silently disagree with the weights. Use ``from_config(config, key=value)`` instead.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a component's config is read-only; build a new one with from_config(config, key=value)")

    __setitem__ = __delitem__ = __setattr__ = _refuse  # type: ignore[assignment]
    update = pop = popitem = clear = setdefault = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenConfig, (dict(self),))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "tolist"):  # numpy arrays and tensors, e.g. trained_betas
        return value.tolist()
    return value


def _init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    params = inspect.signature(cls.__init__).parameters
    return {
        name: p
        for name, p in params.items()
        if name != "self" and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


@functools.cache
def _accepted_keys(cls: type) -> frozenset[str]:
    return frozenset(set(_init_parameters(cls)) - set(getattr(cls, "ignore_for_config", ())))


def register_to_config(init: Callable[..., None]) -> Callable[..., None]:
    """Decorate ``__init__`` so that its arguments, defaults included, become ``self.config``."""

    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: ConfigMixin, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = {}
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if name == "self" or name in type(self).ignore_for_config:
                continue
            if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
                continue
            values[name] = value
        object.__setattr__(self, "_config", FrozenConfig(values))
        init(self, *args, **kwargs)

    return wrapper


class ConfigMixin:
    """Gives a class ``config``, ``from_config``, ``load_config`` and ``save_config``."""

    config_name: ClassVar[str] = "config.json"
    ignore_for_config: ClassVar[tuple[str, ...]] = ()

    @property
    def config(self) -> FrozenConfig:
        return self.__dict__.get("_config", FrozenConfig())

    def register_to_config(self, **values: Any) -> None:
        """Record values in the config after construction (for values derived in ``__init__``)."""
        object.__setattr__(self, "_config", FrozenConfig({**self.config, **values}))

    @classmethod
    def accepted_config_keys(cls) -> frozenset[str]:
        return _accepted_keys(cls)

    def option(self, key: str, default: Any = None) -> Any:
        """A config value this class takes itself; keys carried over from another class's config
        (see :meth:`from_config`) read as ``default``, as they would in that class's own config."""
        return self.config.get(key, default) if key in _accepted_keys(type(self)) else default

    @classmethod
    def filter_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Keep the keys ``__init__`` accepts; drop private (``_``) and stale keys, logging the latter."""
        accepted = cls.accepted_config_keys()
        kept: dict[str, Any] = {}
        for key, value in config.items():
            if key in accepted:
                kept[key] = value
            elif not key.startswith("_"):
                logger.debug("%s ignores config key %r", cls.__name__, key)
        return kept

    @classmethod
    def from_config(cls: type[T], config: Mapping[str, Any] | None = None, **overrides: Any) -> T:
        """Build from a config mapping (another component's ``.config`` works), overriding some keys."""
        merged = {**dict(config or {}), **overrides}
        instance = cls(**cls.filter_config(merged))
        # Keys this class does not take stay in its config, so that a component swapped in from it
        # (``DDIMScheduler.from_config(pndm.config)``) still sees the checkpoint's ``clip_sample``.
        carried = {k: v for k, v in merged.items() if not k.startswith("_") and k not in instance.config}
        if carried:
            instance.register_to_config(**carried)
        return instance

    @classmethod
    def load_config(cls, folder: str | Path, subfolder: str | None = None) -> dict[str, Any]:
        """Read ``config_name`` from a folder; a missing or malformed file is one clear error."""
        data = read_json_object(Path(folder) / (subfolder or "") / cls.config_name)
        assert data is not None  # required
        return data

    def save_config(self, folder: str | Path) -> Path:
        """Write the config (with ``_class_name``) as JSON into ``folder``."""
        from gesso import __version__

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = {"_class_name": type(self).__name__, "_gesso_version": __version__, **_jsonable(dict(self.config))}
        path = folder / self.config_name
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path
