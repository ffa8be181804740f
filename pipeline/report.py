"""How numbers and text look in reports (CLI lines, Prefect artifacts, model cards, benchmark tables).

Every report that shows a fraction as a percentage calls `pct`, so the same score reads the
same everywhere (and a missing or NaN score is a '-', never 'nan%'). Text that came from a user
or a file (ids, notes, file names) goes through `printable` before it reaches a terminal, so an
ANSI escape sequence in an id is shown, not executed.
"""
from __future__ import annotations

import math
from typing import Any


def pct(v: Any, digits: int = 2) -> str:
    """A fraction as a percentage (0.6907 -> '69.07%'); '-' for None or NaN."""
    if v is None:
        return "-"
    v = float(v)
    return "-" if math.isnan(v) else f"{100 * v:.{digits}f}%"


def printable(text: Any) -> str:
    """`text` safe to echo on a terminal: every non-printable character (ESC, BEL, NUL, newline,
    bidi overrides, undecodable bytes carried as surrogates) as its Python escape (`\\x1b`)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
