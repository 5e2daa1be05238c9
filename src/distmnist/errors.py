"""The one exception type for user mistakes.

Entry points catch :class:`DistMnistError`, print its message as one line on stderr and exit with
:data:`USAGE_EXIT` (2). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

USAGE_EXIT = 2


class DistMnistError(Exception):
    """A problem the user can fix: bad config, missing data, foreign file. The message says how."""


def report_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap an entry point: a DistMnistError becomes one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except DistMnistError as err:
            message = " ".join(str(err).split())
            print(f"distmnist: error: {message}", file=sys.stderr, flush=True)
            return USAGE_EXIT

    return wrapper
