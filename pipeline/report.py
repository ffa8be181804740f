"""How numbers look in reports (CLI lines, Prefect artifacts, model cards, benchmark tables).

Every report that shows a fraction as a percentage calls `pct`, so the same score reads the
same everywhere (and a missing or NaN score is a '-', never 'nan%').
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
