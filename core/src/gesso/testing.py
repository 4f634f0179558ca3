"""pytest plugin for gesso and its plugin authors (registered under the ``pytest11`` entry point).

Installing gesso makes these available in any pytest run (``-p gesso.testing`` when plugin
autoloading is off); ``docs/writing-plugins.md`` shows them in use.

Fixtures:

- ``plugin_host(*plugins, entry_points=False, allow_failures=False, **options)``: a fresh
  :class:`~gesso.plugins.PluginHost` with the built-ins and the given plugin objects (or module
  names) registered, installed as the process-wide host for the test. ``entry_points=True`` also
  loads the installed plugins, ``entry_points=["sd15"]`` only those. A given plugin that fails to
  register fails the test, unless ``allow_failures=True``;
- ``tiny_checkpoint(family, *, writable=False, **options)``: a folder holding a tiny random-weight
  checkpoint of a family, in the real on-disk layout (written by the family's own
  ``tiny_checkpoint`` hook), written once per test session for each family and options and shared
  by the tests; ``writable=True`` returns a private copy for a test that changes it;
- ``fake_distribution(name, entry_points, requires=())``: a ``*.dist-info`` on ``sys.path`` that
  makes an entry point visible without installing anything (broken or incompatible plugins).

Assertion helpers (each fails the test with a message saying what differed):

- :func:`assert_same_image` / :func:`assert_images_close` / :func:`assert_images_differ`: compare
  images (PIL images, lists of them, arrays or tensors);
- :func:`assert_same_image_for_seed`: run a pipeline or a run config twice with one seed and require
  the same pixels (and another seed to change them);
- :func:`assert_pipelines_agree`: run two pipelines or run configs with one seed and compare;
- :func:`assert_plugin_loads`: an installed entry point imports, is compatible with the running
  gesso, registers without error and implements no deprecated hook.

:func:`render` is what the seed helpers run: it fills in :data:`TINY_CALL` for what a call leaves out.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

#: Call arguments the helpers use when a call leaves them out: a prompt, and few steps.
TINY_CALL: dict[str, Any] = {"prompt": "a red cube on a wooden table", "num_inference_steps": 2}


# -- distributions --------------------------------------------------------------------------------
def write_distribution(
    folder: Path, name: str, entry_points: Mapping[str, str], requires: Sequence[str] = (), version: str = "1.0"
) -> Path:
    """Write ``<name>-<version>.dist-info`` declaring ``gesso`` entry points into ``folder``."""
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    metadata += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(metadata) + "\n")
    lines = ["[gesso]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return folder


# -- images ---------------------------------------------------------------------------------------
def _as_array(image: Any) -> Any:
    """An image, a list of images, an array or a tensor as a numpy array (values as given)."""
    import numpy as np

    if hasattr(image, "detach"):  # torch tensor
        return image.detach().float().cpu().numpy()
    if isinstance(image, list | tuple):
        return np.stack([_as_array(i) for i in image])
    return np.asarray(image)


def _unit_range(array: Any) -> Any:
    """Float64 values in [0, 1]: uint8 (and 0-255 float) images are divided by 255."""
    import numpy as np

    scaled = array.dtype == np.uint8 or (array.size and float(np.abs(array).max()) > 1.0)
    return array.astype(np.float64) / 255.0 if scaled else array.astype(np.float64)


def _difference(a: Any, b: Any) -> tuple[Any, Any, float]:
    import numpy as np

    left, right = _as_array(a), _as_array(b)
    assert left.shape == right.shape, f"image shapes differ: {left.shape} != {right.shape}"
    worst = float(np.abs(_unit_range(left) - _unit_range(right)).max()) if left.size else 0.0
    return left, right, worst


def assert_same_image(a: Any, b: Any) -> None:
    """Pixel-for-pixel equality of two PIL images (or arrays, tensors, lists of images)."""
    left, right, worst = _difference(a, b)
    differing = int((left != right).any(axis=-1).sum()) if left.ndim >= 3 else int((left != right).sum())
    assert differing == 0, f"{differing} pixels differ (by up to {worst:.2e} on a 0-1 scale)"


def assert_images_close(a: Any, b: Any, atol: float = 1e-3) -> None:
    """Images agree within ``atol`` per value, on a 0-1 scale (uint8 images are divided by 255)."""
    _, _, worst = _difference(a, b)
    assert worst <= atol, f"images differ by up to {worst:.2e} per pixel (allowed {atol:.0e})"


def assert_images_differ(a: Any, b: Any, atol: float = 0.0) -> float:
    """Images differ by more than ``atol`` somewhere (0-1 scale); returns the largest difference."""
    _, _, worst = _difference(a, b)
    assert worst > atol, f"images are the same (largest difference {worst:.2e}, needed more than {atol:.0e})"
    return worst


# -- running pipelines and run configs ------------------------------------------------------------
def _is_config(target: Any) -> bool:
    from omegaconf import DictConfig

    return isinstance(target, Mapping | DictConfig | str | Path)


def _config_mapping(target: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(target, str | Path):
        from gesso.config import load_yaml

        target = load_yaml(target)
    if isinstance(target, DictConfig):
        return OmegaConf.to_container(target, resolve=True)  # type: ignore[return-value]
    return dict(target)


def render(target: Any, seed: int = 0, **call: Any) -> Any:
    """The images of one run as a numpy array ``(images, height, width, 3)``.

    ``target`` is a pipeline (called with ``generator=torch.Generator("cpu").manual_seed(seed)`` and
    ``output_type="np"`` unless given) or a run config (a mapping, a ``DictConfig`` or a YAML path,
    run by :func:`gesso.run` with ``seed`` and without writing files; the images are uint8). Keys of
    :data:`TINY_CALL` that neither the config nor ``call`` sets are filled in.
    """
    import torch

    if _is_config(target):
        from gesso.runner import run

        config = _config_mapping(target)
        merged = {**{k: v for k, v in TINY_CALL.items() if k not in config}, **config, **call, "seed": seed}
        return _as_array(run(merged, write=False).images)
    if not callable(target):
        raise TypeError(f"render() needs a pipeline or a run config, not {type(target).__name__}")
    defaults = {k: v for k, v in TINY_CALL.items() if not (k == "prompt" and call.get("prompt_embeds") is not None)}
    arguments = {**defaults, "output_type": "np", **call}
    result = target(**arguments, generator=torch.Generator("cpu").manual_seed(seed))
    images = result.images if hasattr(result, "images") else result[0]
    return _as_array(images)


def _render_isolated(target: Any, seed: int, global_seed: int, call: Mapping[str, Any]) -> Any:
    """Render with the global torch RNG set to ``global_seed`` (restored afterwards), so that
    noise drawn from the global RNG instead of the call's generator shows up as a difference."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(global_seed)
        return render(target, seed, **call)


def assert_same_image_for_seed(target: Any, seed: int = 0, *, other_seed: int | None = -1, **call: Any) -> Any:
    """Run ``target`` (a pipeline or a run config) twice with ``seed``: the pixels must be equal.

    Between the two runs the global torch RNG is set differently, so a sampler or conditioner that
    draws noise without the call's generator fails. Then ``other_seed`` (default ``seed + 1``;
    None skips it) must give a different image, so a pipeline that ignores the seed fails too.
    Returns the images of the first run.
    """
    first = _render_isolated(target, seed, 1234, call)
    second = _render_isolated(target, seed, 4321, call)
    left, right, worst = _difference(first, second)
    if (left != right).any():
        pytest.fail(
            f"seed {seed} gave two different images (by up to {worst:.2e} on a 0-1 scale): noise is drawn outside the call's generator, or a run changes state"
        )
    if other_seed is not None:
        other_seed = seed + 1 if other_seed == -1 else other_seed
        other = _render_isolated(target, other_seed, 1234, call)
        if not (_as_array(other) != left).any():
            pytest.fail(f"seeds {seed} and {other_seed} gave the same image: the seed does not reach the initial noise")
    return first


def assert_pipelines_agree(first: Any, second: Any, seed: int = 0, *, atol: float = 0.0, **call: Any) -> tuple[Any, Any]:
    """Run two pipelines or run configs with one seed and the same arguments; the images must agree:
    pixel for pixel with ``atol=0``, else within ``atol`` per value on a 0-1 scale. Returns both."""
    a = render(first, seed, **call)
    b = render(second, seed, **call)
    if atol == 0.0:
        assert_same_image(a, b)
    else:
        assert_images_close(a, b, atol=atol)
    return a, b


# -- plugins --------------------------------------------------------------------------------------
def assert_plugin_loads(name: str, *, deprecations: str = "error") -> Any:
    """Load the installed entry point ``name`` (group ``gesso``) alone and return its ``PluginInfo``.

    Fails the test when no such entry point is installed, when the plugin's ``gesso`` requirement
    excludes the running gesso, when it fails to import or to register, and (``deprecations=
    "error"``, the default; ``"ignore"`` to allow) when it implements a deprecated hook or argument.
    """
    from importlib import metadata

    from gesso.hookspecs import GessoDeprecationWarning
    from gesso.plugins import ENTRY_POINT_GROUP, PluginHost

    if deprecations not in ("error", "ignore"):
        raise ValueError(f"deprecations must be 'error' or 'ignore', not {deprecations!r}")
    installed = sorted({e.name for e in metadata.entry_points(group=ENTRY_POINT_GROUP)})
    if name not in installed:
        pytest.fail(f"no {ENTRY_POINT_GROUP!r} entry point named {name!r} is installed (installed: {', '.join(installed) or 'none'})")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        host = PluginHost(allow=[name], deny=[], strict=False)
    for failure in host.failures:
        if failure.name == name:
            details = f"\n{failure.details}" if failure.details else ""
            pytest.fail(f"plugin {name!r} ({failure.distribution}) failed at {failure.stage}: {failure.error}{details}")
    deprecated = [w for w in caught if issubclass(w.category, GessoDeprecationWarning)]
    if deprecated and deprecations == "error":
        where = "; ".join(f"{w.message} ({Path(w.filename).name}:{w.lineno})" for w in deprecated)
        pytest.fail(f"plugin {name!r} uses deprecated parts of the gesso contract: {where}")
    return next(p for p in host.plugins if p.name == name)


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture
def plugin_host() -> Iterator[Callable[..., Any]]:
    """Make a fresh PluginHost (the process-wide one for this test): ``plugin_host(*plugins, ...)``."""
    import importlib

    from gesso.plugins import PluginHost, set_host

    def make(*plugins: Any, entry_points: bool | Iterable[str] = False, allow_failures: bool = False, **options: Any) -> PluginHost:
        if not isinstance(entry_points, bool):
            options.setdefault("allow", list(entry_points))
            options.setdefault("deny", [])
            entry_points = True
        host = PluginHost(entry_points=entry_points, **options)
        for plugin in plugins:
            if isinstance(plugin, str):
                plugin = importlib.import_module(plugin)
            if host.register(plugin) is None and not allow_failures:
                failure = host.failures[-1]
                pytest.fail(f"plugin {failure.name!r} did not register: {failure.error}\n{failure.details}")
        set_host(host)
        return host

    yield make
    set_host(None)


@pytest.fixture(scope="session")
def _gesso_tiny_checkpoints() -> dict[Any, Path]:
    """The tiny checkpoints written in this test session, by family, writer and options."""
    return {}


@pytest.fixture
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, _gesso_tiny_checkpoints: dict[Any, Path]) -> Callable[..., Path]:
    """Get a tiny checkpoint folder of a family: ``tiny_checkpoint("sd15", safety_checker=True)``.

    The family is looked up in the current host (so one registered with ``plugin_host`` works),
    else among the installed plugins. The folder is shared by every test of the session that asks
    for the same family and options: treat it as read-only, or pass ``writable=True`` for a copy.
    """
    from gesso.contract import load_object
    from gesso.plugins import PluginHost, get_host

    def make(family: str, *, writable: bool = False, **options: Any) -> Path:
        spec = get_host().registry.families.get(family)
        if spec is None:
            spec = PluginHost(strict=False).registry.families.get(family)
        if spec is None or spec.tiny_checkpoint is None:
            pytest.fail(f"family {family!r} is not installed or offers no tiny checkpoint")
        writer = spec.tiny_checkpoint
        try:
            hash(writer)
        except TypeError:
            writer = repr(writer)
        key = (family, writer, repr(sorted(options.items())))
        if key not in _gesso_tiny_checkpoints:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            load_object(spec.tiny_checkpoint)(folder, **options)
            _gesso_tiny_checkpoints[key] = folder
        folder = _gesso_tiny_checkpoints[key]
        if writable:
            copy = tmp_path_factory.mktemp(f"tiny-{family}-copy") / folder.name
            shutil.copytree(folder, copy)
            return copy
        return folder

    return make


@pytest.fixture
def fake_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Make an entry point visible: ``fake_distribution("gesso-x", {"x": "module"}, requires=[...])``."""

    def make(name: str, entry_points: Mapping[str, str], requires: Sequence[str] = (), version: str = "1.0") -> Path:
        folder = write_distribution(tmp_path / "site", name, entry_points, requires, version)
        monkeypatch.syspath_prepend(str(folder))
        import importlib

        importlib.invalidate_caches()
        return folder

    return make


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: full-size component tests (seconds to a minute each)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run on the device machine)")
