"""pytest plugin for gesso and its plugin authors (registered under the ``pytest11`` entry point).

Fixtures:

- ``plugin_host(*plugins, entry_points=False)``: a fresh :class:`~gesso.plugins.PluginHost` with the
  built-ins and the given plugin objects registered, installed as the process-wide host for the test;
- ``tiny_checkpoint(family)``: a folder holding a tiny random-weight checkpoint of an installed
  family, in the real on-disk layout (written by the family's own ``tiny_checkpoint`` hook);
- ``fake_distribution(name, entry_points, requires=())``: a ``*.dist-info`` on ``sys.path`` that
  makes an entry point visible without installing anything (broken or incompatible plugins).

Assertion helpers: :func:`assert_same_image` and :func:`assert_images_close`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest


def write_distribution(folder: Path, name: str, entry_points: Mapping[str, str], requires: Sequence[str] = (), version: str = "1.0") -> Path:
    """Write ``<name>-<version>.dist-info`` declaring ``gesso`` entry points into ``folder``."""
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    metadata += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(metadata) + "\n")
    lines = ["[gesso]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return folder


def assert_same_image(a: Any, b: Any) -> None:
    """Pixel-for-pixel equality of two PIL images (or arrays)."""
    import numpy as np

    left, right = np.asarray(a), np.asarray(b)
    assert left.shape == right.shape, f"image shapes differ: {left.shape} != {right.shape}"
    differing = int((left != right).any(axis=-1).sum()) if left.ndim == 3 else int((left != right).sum())
    assert differing == 0, f"{differing} pixels differ"


def assert_images_close(a: Any, b: Any, atol: float = 1e-3) -> None:
    """Images as float arrays in [0, 1] agree within ``atol`` per pixel."""
    import numpy as np

    left, right = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if left.max() > 1.0 or right.max() > 1.0:
        left, right = left / 255.0, right / 255.0
    assert left.shape == right.shape, f"image shapes differ: {left.shape} != {right.shape}"
    worst = float(np.abs(left - right).max())
    assert worst <= atol, f"images differ by up to {worst:.2e} per pixel (allowed {atol:.0e})"


@pytest.fixture
def plugin_host() -> Iterator[Callable[..., Any]]:
    from gesso.plugins import PluginHost, set_host

    def make(*plugins: Any, entry_points: bool = False, **options: Any) -> PluginHost:
        host = PluginHost(entry_points=entry_points, **options)
        for plugin in plugins:
            host.register(plugin)
        set_host(host)
        return host

    yield make
    set_host(None)


@pytest.fixture
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    from gesso.contract import load_object
    from gesso.plugins import get_host

    made: dict[str, Path] = {}

    def make(family: str, **options: Any) -> Path:
        key = f"{family}-{sorted(options.items())}"
        if key not in made:
            spec = get_host().registry.families.get(family)
            if spec is None or spec.tiny_checkpoint is None:
                pytest.fail(f"family {family!r} is not installed or offers no tiny checkpoint")
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            load_object(spec.tiny_checkpoint)(folder, **options)
            made[key] = folder
        return made[key]

    return make


@pytest.fixture
def fake_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
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
