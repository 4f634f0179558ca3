"""docs/writing-plugins.md shows the example plugins' files as they are: a block marked
``<!-- file: PATH -->`` is that whole file, one marked ``<!-- excerpt: PATH -->`` a part of it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "writing-plugins.md"
MARKED_BLOCK = re.compile(r"<!-- (file|excerpt): (\S+) -->\n```\w*\n(.*?)```\n", re.S)


def marked_blocks() -> list[tuple[str, str, str]]:
    return MARKED_BLOCK.findall(GUIDE.read_text())


def test_the_guide_shows_files_of_both_examples():
    paths = {path for _, path, _ in marked_blocks()}
    assert any(p.startswith("examples/gesso-example-scheduler/") for p in paths)
    assert any(p.startswith("examples/gesso-example-vae-slicing/") for p in paths)


@pytest.mark.parametrize(("kind", "path", "block"), marked_blocks(), ids=[f"{kind}:{path}" for kind, path, _ in marked_blocks()])
def test_marked_blocks_are_the_files(kind, path, block):
    text = (REPO / path).read_text()
    if kind == "file":
        assert block == text, f"docs/writing-plugins.md shows an outdated {path}"
    else:
        assert block in text, f"docs/writing-plugins.md quotes a part of {path} that is no longer there"


def test_every_example_has_its_own_package_and_tests():
    for example in sorted((REPO / "examples").glob("gesso-example-*")):
        pyproject = (example / "pyproject.toml").read_text()
        assert '"gesso>=0.1,<0.2"' in pyproject and "[project.entry-points.gesso]" in pyproject, example.name
        assert list((example / "tests").glob("test_*.py")), f"{example.name} has no tests"
