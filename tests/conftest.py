"""Cross-package fixtures: the fake family, installed as an entry point for subprocess CLI runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from gesso.testing import write_distribution

FAKE_FAMILY_DIR = Path(__file__).parent / "fake_family"


@pytest.fixture
def fake_site(tmp_path: Path) -> Path:
    """A folder that, on PYTHONPATH, makes the fake family (and nothing else new) discoverable."""
    site = tmp_path / "site"
    write_distribution(site, "gesso-fake-family", {"fake": "gesso_fake_family"})
    return site


@pytest.fixture
def fake_checkpoint(tmp_path: Path) -> Path:
    sys.path.insert(0, str(FAKE_FAMILY_DIR))
    try:
        from gesso_fake_family import write_checkpoint
    finally:
        sys.path.remove(str(FAKE_FAMILY_DIR))
    return write_checkpoint(tmp_path / "fake-model")


@pytest.fixture
def cli(fake_site: Path, tmp_path: Path):
    """Run the real ``gesso`` executable with the fake family discoverable."""

    def run(*args: str, extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
        paths = [str(fake_site), str(FAKE_FAMILY_DIR)] + ([str(extra_path)] if extra_path else [])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}
        return subprocess.run([sys.executable, "-m", "gesso", *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)

    return run
