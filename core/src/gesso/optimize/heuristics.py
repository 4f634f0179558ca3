"""Inductor's code-generation heuristics, adjusted for the UNets' row reductions.

Inductor keeps a whole row of a reduction in registers ("persistent") only up to 1,024 elements;
longer rows are reduced in a loop that reads the row twice, once for the statistics and once to
normalise. SDXL's transformer blocks normalise 1,280-wide rows (three LayerNorms, each fused with
the residual add before it, 210 a step): looped, each took 10-14 µs on an H200 where one read and
one write of the tensors take under 5 µs (``benchmarks/NOTES.md``). :class:`UNetChoices` lets rows
of up to :data:`PERSISTENT_ROW_LIMIT` elements be reduced persistently; every other choice is
Inductor's own. The heuristics change only which kernel computes a result, not the result's
definition: the persistent and looped forms compute the same statistics.

:func:`active` applies them while gesso compiles a block, through Inductor's documented extension
point (``InductorChoices``), and leaves the user's own ``torch.compile`` calls alone. The blocks of
``compile`` (and ``compile_vae``) compile under it; ``compile_full`` and ``GESSO_COMPILE_CACHE=off``
compile lazily inside torch's own module wrapper and keep Inductor's defaults.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

#: The longest row (in elements) reduced in one pass: the limit of the measured runs. Besides
#: SDXL's 1,280-wide LayerNorm rows (timed apart), it turned some of SD1.5's and Kandinsky's
#: chunked GroupNorm statistics persistent, which moved their time within noise. A row of 4,096
#: float32 values is 16 registers a thread at Inductor's 8 warps.
PERSISTENT_ROW_LIMIT = 4096

#: Whether :func:`active` applies the heuristics (benchmarks switch it off to measure the difference).
ENABLED = True


def _choices_class() -> type:
    """``UNetChoices``; an ImportError or AttributeError where this torch's Inductor has no such
    choice to make (then :func:`active` leaves Inductor as it is)."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint

    if not hasattr(InductorChoices, "should_use_persistent_reduction"):
        raise AttributeError("this torch's Inductor chooses persistent reductions elsewhere")

    class UNetChoices(InductorChoices):
        """Inductor's choices, but rows of up to ``PERSISTENT_ROW_LIMIT`` elements reduce persistently."""

        def should_use_persistent_reduction(self, features: Any, *args: Any, **kwargs: Any) -> bool:
            if super().should_use_persistent_reduction(features, *args, **kwargs):
                return True
            from torch._inductor.virtualized import V

            try:
                along_rows = features.get_reduction_hint() == ReductionHint.INNER
                return along_rows and bool(V.graph.sizevars.statically_known_leq(features.reduction_numel, PERSISTENT_ROW_LIMIT))
            except AttributeError:  # another torch's description of a kernel: Inductor's choice stands
                return False

        def uuid(self) -> str:  # part of Inductor's cache key where the torch version asks for it
            return f"gesso-{signature()}"

    return UNetChoices


_unet_choices: Any = None


def signature() -> str:
    """What compiled code depends on here (part of gesso's compile-cache key)."""
    return f"unet-choices-{PERSISTENT_ROW_LIMIT}" if ENABLED else "inductor"


def unet_choices() -> Any:
    """The one :class:`UNetChoices` instance (Inductor calls the config's factory once per use)."""
    global _unet_choices
    if _unet_choices is None:
        _unet_choices = _choices_class()()
    return _unet_choices


@contextlib.contextmanager
def active() -> Iterator[None]:
    """Inductor compiles with gesso's heuristics inside this block (a no-op where Inductor has no
    ``InductorChoices`` to extend). Where the torch version has the ``inductor_choices_class``
    setting, that is used, so Inductor's own cache tells these kernels apart from its defaults."""
    if not ENABLED:
        yield
        return
    try:
        from torch._inductor import config
        from torch._inductor.virtualized import V

        choices = unet_choices()
    except (ImportError, AttributeError):
        yield
        return
    # The handler first: entering it reads the thread's current choices (made from the config on
    # first use) to restore them on exit, and the config must still be Inductor's own then.
    with V.set_choices_handler(choices):
        if hasattr(config, "inductor_choices_class"):
            with config.patch(inductor_choices_class=unet_choices):
                yield
        else:
            yield
