"""What a root main (``train.py``, ``sample.py``, ...) does with an error: a user's mistake (a shard pattern
that matches nothing, ``prompts=[]``, a missing checkpoint, a bad ``n``) is one line, ``error: ...`` on
stderr and exit status 2; a bug (``RuntimeError``, ``TypeError``, ``AssertionError``, ...) keeps its
traceback. ``HYDRA_FULL_ERROR=1`` shows the traceback for user errors too.

The wrapper sits inside ``@hydra.main`` (it wraps the task function), so it sees the error before Hydra's
own handler does; Hydra catches ``Exception`` only, so the ``SystemExit`` passes through with its status.
Hydra's config errors (``foo=1``, ``model=nonexistent``) happen before the task function runs: Hydra
reports those itself (its message, exit status 1).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

from omegaconf.errors import OmegaConfBaseException

EXIT_USER_ERROR = 2
T = TypeVar("T")


class UserError(ValueError):
    """Bad input from the command line or config: the message says what was wrong and what to do."""


# FileNotFoundError/PermissionError: a path given that is not there or not readable; ValueError: a bad
# value (UserError, unclip.loading.CheckpointError); OmegaConf's errors: a missing value or an unknown key
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, ValueError, OmegaConfBaseException)


def full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def user_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorates a Hydra task function (put it below ``@hydra.main``): user errors become
    ``error: <message>`` and exit status 2, unless ``HYDRA_FULL_ERROR=1``."""

    @functools.wraps(fn)  # sets __wrapped__: Hydra unwraps it to find conf/ beside the calling script
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exn:  # noqa: BLE001 - re-raised unless it is a user error
            cause = user_error(exn)
            if cause is None or full_error():
                raise
            print(f"error: {message(cause)}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapper


def user_error(exn: BaseException) -> BaseException | None:
    """The user error in ``exn``: itself, or what ``hydra.utils.instantiate`` wrapped (a missing CLIP
    weights file comes as an ``InstantiationException`` whose cause is the ``FileNotFoundError``)."""
    from hydra.errors import InstantiationException

    while isinstance(exn, InstantiationException) and exn.__cause__ is not None:
        exn = exn.__cause__
    return exn if isinstance(exn, USER_ERRORS) else None


def message(exn: BaseException) -> str:
    # a KeyError's str() is the repr of its key; OmegaConf's errors carry their own text
    text = exn.args[0] if isinstance(exn, KeyError) and exn.args and isinstance(exn.args[0], str) else str(exn)
    return text.strip() or type(exn).__name__
