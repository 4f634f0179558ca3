"""Meta-tests of the plugin contract: every hook is documented with its exact signature and tested."""

from __future__ import annotations

import inspect
from pathlib import Path

from gesso import hookspecs
from gesso.plugins import _hook_names

REPO = Path(__file__).resolve().parents[2]


def test_hook_names_follow_the_register_pattern():
    names = _hook_names()
    assert len(names) == 5
    for name in names:
        assert list(inspect.signature(getattr(hookspecs, name)).parameters) == ["register"]


def test_every_hook_is_documented_with_its_exact_signature():
    doc = (REPO / "docs" / "plugin-hooks.md").read_text()
    for name in _hook_names():
        function = getattr(hookspecs, name)
        signature = inspect.signature(function)
        params = ", ".join(f"{p.name}: {p.annotation}" for p in signature.parameters.values())
        line = f"def {name}({params}) -> {signature.return_annotation}"
        assert f"## {name}" in doc, f"docs/plugin-hooks.md has no section for {name}"
        assert line in doc, f"docs/plugin-hooks.md does not show the signature: {line}"
        assert function.__doc__ and function.__doc__.count("\n") == 0, f"{name} needs a one-line docstring"


def test_every_hook_has_a_test():
    sources = "\n".join(p.read_text() for p in REPO.glob("**/test_*.py") if ".git" not in p.parts)
    for name in _hook_names():
        assert f"def {name}(" in sources, f"no test implements hook {name}"
