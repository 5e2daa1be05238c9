"""The one exception type for user mistakes.

Entry points catch :class:`DistMnistError`, print its message as one line on stderr and exit with
:data:`USAGE_EXIT` (2). Anything else is a bug and keeps its traceback.

A mistake every process meets alike (the command line, the config, the run dir) is printed once: by local rank 0
(:class:`UsageError`), or by rank 0 after the ranks agreed on it (:class:`AgreedError`). Under torchrun the line is
also written to the worker's error file (``TORCHELASTIC_ERROR_FILE``), so that torchrun's failure summary names it
as the root cause instead of "To enable traceback see ...".
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

USAGE_EXIT = 2
RANK_LOST_EXIT = 1
STOPPED_EXIT = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; run the same command to resume
DIVERGED_EXIT = 3  # the loss or the weights became non-finite: stopped before writing them (no model.pt)
STARTUP_EXIT = 69  # EX_UNAVAILABLE: not every process reached the process group within dist.startup_timeout_s
# Ctrl-C (SIGINT): the same agreed stop and checkpoint as SIGTERM, but 128+SIGINT, the code a shell gives a program
# that Ctrl-C ended, not 75: 75 tells slurm/train.sh (and any requeue or retry loop) "resumable, start it again",
# and a user who pressed Ctrl-C asked for the run to stop, not to be restarted. The same command resumes it.
INTERRUPTED_EXIT = 128 + signal.SIGINT
# the codes whose one line a process printed itself (tools/torchrun.py passes them on without torchrun's summary)
SAID_EXITS = (USAGE_EXIT, DIVERGED_EXIT, STARTUP_EXIT, STOPPED_EXIT, INTERRUPTED_EXIT)
# how long a process that leaves an alike error to another rank to print waits for torchrun to stop it
ALIKE_WAIT_S = 30.0


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


class UsageError(DistMnistError):
    """A DistMnistError every process of a node raises with the same message before any process group exists,
    because it follows from the command line, the config and the node's files alone (see :func:`alike_on_every_rank`):
    local rank 0 alone prints it, once per node."""


@contextmanager
def alike_on_every_rank() -> Iterator[None]:
    """Code whose mistakes depend only on the command line, the config files and this node's files (parsing the
    arguments, checking the run dir): a DistMnistError raised in it becomes a :class:`UsageError`."""
    try:
        yield
    except (UsageError, AgreedError):
        raise
    except DistMnistError as err:
        raise UsageError(str(err)) from None


class StartupIncomplete(Exception):
    """Not every process reached the process group within dist.startup_timeout_s; the message names the missing
    ranks (and nodes, where the launcher tells) and what to check. Not a usage error: the same command may work
    once the missing node is up (exit 69, EX_UNAVAILABLE)."""


class NetworkUnusable(StartupIncomplete):
    """This node's network cannot carry the job (core/network.py says why, before any store or collective): the same
    for every process of the node, so its local rank 0 alone prints it (exit 69 on each)."""


class PeerStopped(Exception):
    """A collective failed because another rank stopped on a known error, whose one line that rank left in the job's
    store (core/peers.py): the message names its rank, host and line (exit 1, as for lost peers)."""


def known_line(err: BaseException) -> str | None:
    """The one line a rank prints for a known error that it may meet alone (a DistMnistError that is not agreed by
    every rank, a divergence); None for the rest (bugs, signals, errors every rank says alike)."""
    if isinstance(err, AgreedError):
        return None
    if isinstance(err, DistMnistError):
        return " ".join(str(err).split())
    if isinstance(err, Diverged):
        return str(err)
    return None


class Stopped(Exception):
    """Training stopped on SIGTERM/SIGUSR1/SIGINT (`signum`) after every rank wrote its part of a checkpoint."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = signum


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


def local_rank() -> int:
    """The rank on this node from the launcher's environment (0 without one)."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def record_for_torchrun(line: str, code: int) -> None:
    """Under torchrun: `line` into this worker's error file, where torchrun's summary ("Root Cause") reads it.
    The format is that of torch.distributed.elastic's ErrorHandler.record_exception (torch 2.x); torchrun copies
    the root cause's file to its own TORCHELASTIC_ERROR_FILE, where a scheduler may look."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE") if under_torchrun() else None
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}},
            "distmnist": {"exit": code}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:  # the summary then says torchrun's own words; the line is on stderr anyway
        pass


def count(n: int, noun: str, plural: str | None = None) -> str:
    """'1 epoch', '2 epochs', '3 processes': a number and its noun, for what a user reads."""
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


def say(message: str, code: int, printer: str = "every", prefix: str = "distmnist: error: ",
        wait: bool = True) -> int:
    """Print ``prefix + message`` as one line on stderr and return `code`; under torchrun `message` also goes into
    the error file of the process that prints it, or of one that exits quietly at once.

    `printer`: "every" process prints its own line; "zero": rank 0 alone, after the ranks agreed on it; "local":
    local rank 0 alone (a :class:`UsageError`: every process of the node meets it alike). A process that leaves the
    line to another one exits quietly -- except, with `wait`, under torchrun on the printer's node: there it first
    waits (up to ALIKE_WAIT_S) for torchrun to stop it, because torchrun stops the other workers (SIGTERM) as soon
    as one exits, and the printer must not be stopped before it has printed. A "local" error that the wait
    outlives was not met by local rank 0 after all: then this process prints it too."""
    quiet = (printer == "zero" and process_rank() != 0) or (printer == "local" and local_rank() != 0)
    if quiet:
        if not (wait and under_torchrun() and (printer == "local" or os.environ.get("GROUP_RANK", "0") == "0")):
            record_for_torchrun(message, code)
            return code
        # no error file yet: torchrun's "Root Cause" is the earliest one, and that must be the printer's
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the stop handler the Trainer installs before fit
        time.sleep(ALIKE_WAIT_S)  # torchrun's SIGTERM ends this process here once the printer has exited
        if printer == "zero":
            return code
    print(f"{prefix}{message}", file=sys.stderr, flush=True)
    record_for_torchrun(message, code)
    return code


def interrupted_while_starting(signum, frame) -> None:
    """SIGINT's handler from the import of ``distmnist`` under ``python -m`` until an entry point's main starts
    (report_errors, tools/torchrun.py): nothing has run yet, there is nothing to save. Under a launcher every
    process gets the Ctrl-C: rank 0 says it."""
    if process_rank() == 0:
        os.write(2, b"distmnist: interrupted (Ctrl-C) while starting; nothing was run\n")
    os._exit(INTERRUPTED_EXIT)


def quiet_ctrl_c_while_starting() -> None:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup, &)
        signal.signal(signal.SIGINT, interrupted_while_starting)


def stop_starting() -> None:
    """An entry point's main has started: Ctrl-C raises KeyboardInterrupt again (report_errors makes it one line),
    until the training loop takes it over."""
    if signal.getsignal(signal.SIGINT) is interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def report_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap an entry point: a DistMnistError becomes one line on stderr and exit code 2, a Stopped exit 75 (130
    after Ctrl-C), a Diverged exit 3; a collective that lost its peers exit 1; a start-up that not every process
    reached exit 69; a peer's known failure (PeerStopped) its line and exit 1; a Ctrl-C outside the training loop
    (KeyboardInterrupt) one line and exit 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        stop_starting()
        try:
            return main(*args, **kwargs) or 0
        except StartupIncomplete as err:  # every process that came says it: the missing ones may say nothing
            # the network cannot work (core/network): the same for every process of the node, said once there
            return say(str(err), STARTUP_EXIT, "local" if isinstance(err, NetworkUnusable) else "every")
        except DistMnistError as err:
            printer = "zero" if isinstance(err, AgreedError) else "local" if isinstance(err, UsageError) else "every"
            return say(" ".join(str(err).split()), USAGE_EXIT, printer)
        except PeerStopped as err:  # every rank whose collective failed says who stopped and why (core/peers.py)
            return say(str(err), RANK_LOST_EXIT)
        except RuntimeError as err:  # torch.distributed's errors (DistError and its kin) are RuntimeErrors
            line = collective_failure(err)
            if line is None:
                raise
            return say(line, RANK_LOST_EXIT)
        except (Stopped, Diverged) as stop:
            # Every rank stops at the same step: the launcher's follow-up SIGTERM (torchrun sends one as soon as
            # another rank exits) must not turn this exit into a death by signal while the interpreter shuts down.
            # (SIGINT keeps what the stop left it: the default action, so that a second Ctrl-C quits at once.)
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_IGN)
            diverged = isinstance(stop, Diverged)
            code = DIVERGED_EXIT if diverged else INTERRUPTED_EXIT if stop.signum == signal.SIGINT else STOPPED_EXIT
            # no wait: SIGTERM is ignored now, on rank 0 too (the line is printed whatever torchrun does)
            return say(str(stop), code, "zero", prefix="distmnist: error: " if diverged else "distmnist: ", wait=False)
        except KeyboardInterrupt:
            # Ctrl-C before the training loop took SIGINT over (start-up, data, process group) or after it
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second one quits at once
            line = "interrupted (Ctrl-C) outside the training loop; run the same command again: it resumes from " \
                   "the newest checkpoint in run.dir, if any"
            return say(line, INTERRUPTED_EXIT, "zero", prefix="distmnist: ", wait=False)

    return wrapper
