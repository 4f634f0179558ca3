"""gesso's Inductor heuristics: which row reductions become persistent, and where they apply."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import sympy

pytest.importorskip("torch._inductor.choices")

from gesso.optimize import heuristics  # noqa: E402
from torch._inductor import config  # noqa: E402
from torch._inductor.runtime.hints import ReductionHint  # noqa: E402
from torch._inductor.sizevars import SizeVarAllocator  # noqa: E402
from torch._inductor.virtualized import V  # noqa: E402


def features(row: int, hint: ReductionHint = ReductionHint.INNER, rows: int = 2048) -> SimpleNamespace:
    return SimpleNamespace(reduction_numel=sympy.Integer(row), numel=sympy.Integer(rows), get_reduction_hint=lambda: hint)


@pytest.fixture
def graph():
    with V.set_graph_handler(SimpleNamespace(sizevars=SizeVarAllocator())):
        yield


def persistent(choices, row: int, hint: ReductionHint = ReductionHint.INNER) -> bool:
    return bool(choices.should_use_persistent_reduction(features(row, hint), False))


def test_rows_up_to_the_limit_reduce_persistently_where_inductor_would_loop(graph):
    from torch._inductor.choices import InductorChoices

    inductor, ours = InductorChoices(), heuristics.unet_choices()
    # SDXL's LayerNorm rows: Inductor loops over them, gesso keeps them in registers
    assert not persistent(inductor, 1280) and persistent(ours, 1280)
    assert persistent(ours, heuristics.PERSISTENT_ROW_LIMIT)
    # beyond the limit, and for reductions that are not along rows, Inductor's own choice stands
    assert not persistent(ours, 2 * heuristics.PERSISTENT_ROW_LIMIT)
    for hint in (ReductionHint.OUTER, ReductionHint.DEFAULT):
        assert persistent(ours, 1280, hint) == persistent(inductor, 1280, hint)
    assert persistent(ours, 320) == persistent(inductor, 320)


def test_active_applies_the_choices_only_inside_and_restores_inductors():
    before = type(V.choices)
    with heuristics.active():
        assert V.choices is heuristics.unet_choices()
        if hasattr(config, "inductor_choices_class"):  # where it exists, Inductor's cache key sees it
            assert config.inductor_choices_class is not None
    assert type(V.choices) is before
    if hasattr(config, "inductor_choices_class"):
        assert config.inductor_choices_class is None


def test_active_does_nothing_when_switched_off(monkeypatch):
    monkeypatch.setattr(heuristics, "ENABLED", False)
    with heuristics.active():
        assert V.choices is not heuristics.unet_choices()


def test_active_leaves_inductor_alone_where_it_has_no_such_choice(monkeypatch):
    """An Inductor without ``should_use_persistent_reduction`` (another torch) compiles as it is."""
    from torch._inductor.choices import InductorChoices

    monkeypatch.delattr(InductorChoices, "should_use_persistent_reduction")
    monkeypatch.setattr(heuristics, "_unet_choices", None)
    before = V.choices
    with heuristics.active():
        assert V.choices is before
