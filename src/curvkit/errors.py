"""curvkit's own error and warning classes.

Each error subclasses the built-in a user would catch anyway (``ValueError``, ``TypeError``,
``MemoryError``), so ``except ValueError`` keeps working, and ``except ck.CurvkitError`` catches
everything curvkit raises on purpose.
"""

from __future__ import annotations


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
