"""Progress bars only on a terminal: every project tqdm goes through `tqdm` here, which is
disabled when stderr is not a TTY (a redirected log gets no carriage-return bars; the stages
and the training loop log one line per stage / per epoch instead)."""
from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm as _tqdm


def on_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def tqdm(*args: Any, **kwargs: Any) -> _tqdm:
    """`tqdm.auto.tqdm`, disabled off a terminal (whatever `disable` the caller passed)."""
    if not on_terminal():
        kwargs["disable"] = True
    return _tqdm(*args, **kwargs)
