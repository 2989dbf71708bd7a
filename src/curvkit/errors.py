"""curvkit's own error and warning classes.

Each error subclasses the built-in a user would catch anyway (``ValueError``, ``TypeError``,
``MemoryError``), so ``except ValueError`` keeps working, and ``except ck.CurvkitError`` catches
everything curvkit raises on purpose.
"""

from __future__ import annotations

import math
import numbers

import torch


class CurvkitError(Exception):
    """Base class of every error curvkit raises on purpose."""


class CurvkitValueError(CurvkitError, ValueError):
    """An argument has the right type but a value curvkit cannot use."""


class CurvkitTypeError(CurvkitError, TypeError):
    """An argument has a type curvkit does not accept."""


class CurvkitMemoryError(CurvkitError, MemoryError):
    """A request would allocate more memory than allowed; raised before allocating."""


class CurvkitWarning(UserWarning):
    """A call that still makes sense but probably not what the user meant."""


# -- argument checks shared across the package ---------------------------------------------------


def check_count(name: str, value, meaning: str, advice: str, least: int = 1) -> None:
    """Refuse a count that is not an int >= ``least`` (0 gave NaN, a hang or a raw error; a bool
    is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise CurvkitValueError(
            f"{name} must be an int >= {least} ({meaning}), got {value!r}. {advice}"
        )


def check_positive(name: str, value, kind: str, meaning: str, advice: str) -> None:
    """Refuse a value that is not a finite real number > 0 (NaN, inf, 0 or a bool)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise CurvkitValueError(
            f"{name} must be a finite positive {kind} ({meaning}), got {value!r}. {advice}"
        )


def check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise CurvkitTypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
            "e.g. generator=torch.Generator().manual_seed(0)."
        )
