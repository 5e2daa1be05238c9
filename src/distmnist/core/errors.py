"""The one exception type for user mistakes.

Entry points catch :class:`DistMnistError`, print its message as one line on stderr and exit with
:data:`USAGE_EXIT` (2). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import signal
import sys
from collections.abc import Callable

USAGE_EXIT = 2
RANK_LOST_EXIT = 1
STOPPED_EXIT = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; run the same command to resume
DIVERGED_EXIT = 3  # the loss or the weights became non-finite: stopped before writing them (no model.pt)
STARTUP_EXIT = 69  # EX_UNAVAILABLE: not every process reached the process group within dist.startup_timeout_s


def exit_process(code: int) -> None:
    """End this process with `code`, skipping the interpreter's teardown: run the atexit handlers, flush stdout and
    stderr, then ``os._exit``.

    Why: after an FSDP run, torch's DTensor caches (sharding propagation, redistribution plans) keep the device
    mesh, and with it gloo process groups and their worker threads, alive after ``destroy_process_group`` until the
    interpreter tears its modules down. Destructors that run then, with the interpreter half gone, can abort a
    finished run (``terminate called without an active exception``, SIGABRT): rare, and enough to mark a finished
    SLURM job failed or to redden CI. By the time an entry point returns, everything that matters is done: the
    files are written atomically and closed, the process group is destroyed. Only the ``__main__`` of the entry
    points calls this; code that calls ``main()`` in its own process keeps its interpreter.
    """
    try:
        atexit._run_exitfuncs()  # logging's shutdown, Lightning's destroy of the process group, ...
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed or gone: nothing left to lose
                pass
        os._exit(code)


class DistMnistError(Exception):
    """A problem the user can fix: bad config, missing data, foreign file. The message says how."""


class AgreedError(DistMnistError):
    """A DistMnistError every rank raises with the same message, after agreeing on it: rank 0 alone prints it
    (the others exit 2 quietly), so a job reports it once rather than once per rank."""


class StartupIncomplete(Exception):
    """Not every process reached the process group within dist.startup_timeout_s; the message names the missing
    ranks (and nodes, where the launcher tells) and what to check. Not a usage error: the same command may work
    once the missing node is up (exit 69, EX_UNAVAILABLE)."""


class Stopped(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after every rank wrote its part of a checkpoint."""


class Diverged(Exception):
    """Every rank found the training loss or the weights non-finite at the same step; nothing non-finite written."""


COLLECTIVE_FAILURE = re.compile(
    r"gloo|nccl|connection (reset|closed|refused)|timed out|timeout|broken pipe|DistBackendError", re.IGNORECASE
)


def collective_failure(err: BaseException) -> str | None:
    """One line for a collective that failed because another rank died or stalled; None for other errors."""
    try:
        from torch.distributed import DistError
    except ImportError:  # pragma: no cover
        DistError = ()  # noqa: N806
    text = str(err).strip()
    if not (isinstance(err, DistError) or (isinstance(err, RuntimeError) and COLLECTIVE_FAILURE.search(text))):
        return None
    first = " ".join(text.splitlines()[0].split())[:200] if text else type(err).__name__
    return (
        f"rank {process_rank()} lost its peers in a collective ({first}): another rank died or stalled past "
        f"dist.timeout_s -- its own log says why; the newest checkpoint in run.dir resumes the run"
    )


def process_rank() -> int:
    """The global rank from the launcher's environment (0 without one), readable before any process group."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def report_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap an entry point: a DistMnistError becomes one line on stderr and exit code 2, a Stopped exit 75, a
    Diverged exit 3; a collective that lost its peers exit 1; a start-up that not every process reached exit 69."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except StartupIncomplete as err:  # every process that came says it: the missing ones may say nothing
            print(f"distmnist: error: {err}", file=sys.stderr, flush=True)
            return STARTUP_EXIT
        except DistMnistError as err:
            if not isinstance(err, AgreedError) or process_rank() == 0:
                message = " ".join(str(err).split())
                print(f"distmnist: error: {message}", file=sys.stderr, flush=True)
            return USAGE_EXIT
        except RuntimeError as err:  # torch.distributed's errors (DistError and its kin) are RuntimeErrors
            line = collective_failure(err)
            if line is None:
                raise
            print(f"distmnist: error: {line}", file=sys.stderr, flush=True)
            return RANK_LOST_EXIT
        except (Stopped, Diverged) as stop:
            # Every rank stops at the same step: the launcher's follow-up SIGTERM (torchrun sends one as soon as
            # another rank exits) must not turn this exit into a death by signal while the interpreter shuts down.
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_IGN)
            diverged = isinstance(stop, Diverged)
            if process_rank() == 0:  # one line is enough
                print(f"distmnist: {'error: ' if diverged else ''}{stop}", file=sys.stderr, flush=True)
            return DIVERGED_EXIT if diverged else STOPPED_EXIT

    return wrapper
