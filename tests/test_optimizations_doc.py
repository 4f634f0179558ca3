"""docs/optimizations.md names what the code does: every core block compiled as a region, the
``fast`` preset's members and every built-in optimization."""

from __future__ import annotations

import inspect
from pathlib import Path

import gesso.nn
from gesso.builtin import OPTIMIZATIONS
from gesso.optimize import PRESETS

DOC = (Path(__file__).resolve().parents[1] / "docs" / "optimizations.md").read_text()


def test_the_doc_names_every_core_region_class():
    regions = {name for name, cls in vars(gesso.nn).items() if inspect.isclass(cls) and getattr(cls, "compile_region", False)}
    assert regions, "no region classes found"
    missing = sorted(name for name in regions if f"`{name}`" not in DOC)
    assert not missing, f"docs/optimizations.md does not name the region classes {missing}"


def test_the_doc_names_the_fast_preset_and_every_built_in_optimization():
    assert ", ".join(f"`{name}`" for name in PRESETS["fast"]) in DOC
    missing = sorted(name for name, *_ in OPTIMIZATIONS if f"`{name}`" not in DOC)
    assert not missing, f"docs/optimizations.md does not mention {missing}"
