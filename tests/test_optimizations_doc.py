"""docs/optimizations.md names what the code does: every core block compiled as a region, the
``fast`` preset's members and every optimization that the core and the installed plugins register."""

from __future__ import annotations

import inspect
from pathlib import Path

import gesso.nn
from gesso.optimize import PRESETS
from gesso.plugins import get_host

DOC = (Path(__file__).resolve().parents[1] / "docs" / "optimizations.md").read_text()


def test_the_doc_names_every_core_region_class():
    regions = {name for name, cls in vars(gesso.nn).items() if inspect.isclass(cls) and getattr(cls, "compile_region", False)}
    assert regions, "no region classes found"
    missing = sorted(name for name in regions if f"`{name}`" not in DOC)
    assert not missing, f"docs/optimizations.md does not name the region classes {missing}"


def test_the_doc_names_the_fast_preset_and_every_registered_optimization():
    assert ", ".join(f"`{name}`" for name in PRESETS["fast"]) in DOC
    packages = {"gesso", *(f"gesso_{path.name}" for path in (Path(__file__).resolve().parents[1] / "plugins").iterdir())}
    ours = [spec.name for spec in get_host().registry.optimizations.values() if str(spec.apply).split(".")[0] in packages]
    assert "control_embedding_once" in ours  # the family plugins' optimizations are among them (not the examples')
    missing = sorted(name for name in ours if f"`{name}`" not in DOC)
    assert not missing, f"docs/optimizations.md does not mention {missing}"
