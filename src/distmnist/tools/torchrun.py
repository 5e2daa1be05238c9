"""torchrun, ending with the code and the one line of its workers: what ``launch/single_node.sh`` runs.

    python -m distmnist.tools.torchrun [torchrun options] -m distmnist.<strategy> [config args]

Plain torchrun ends every failed run alike: its agent raises ``ChildFailedError``, Python prints its traceback and
the 35-line failure summary, and the exit code is 1 -- after a usage error (exit 2), a stop on SIGTERM (75) or
Ctrl-C (130) as after a crash. Here the same agent (``torch.distributed.run.main``) runs, and when the first failed
worker (torchrun's "root cause") ended with one of the codes whose line a distmnist process prints itself
(core.errors.SAID_EXITS: 2, 3, 69, 75, 130), this launcher exits with that code and prints nothing more. Any other
failure (a traceback, a death by signal) gets torchrun's summary, without the launcher's own traceback, and exit
1. The agent's log lines about stopping the other workers are left out: the summary says the same.
"""

from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

from distmnist.core.errors import SAID_EXITS, stop_starting

# (logger, the start of a message template) of the agent's lines that a failure summary repeats (torch 2.x)
AGENT_LINES = (
    ("torch.distributed.elastic.multiprocessing.api", "Sending process %s closing signal"),
    ("torch.distributed.elastic.multiprocessing.api", "failed (exitcode: %s)"),
    ("torch.distributed.elastic.multiprocessing.errors.error_handler", "no error file defined for parent"),
    ("torch.distributed.elastic.agent.server.api", "Received %s death signal"),
)


def quiet_agent() -> None:
    for name, start in AGENT_LINES:
        logging.getLogger(name).addFilter(lambda record, start=start: not str(record.msg).startswith(start))


def main(argv: list[str] | None = None) -> int:
    stop_starting()  # torchrun's agent takes SIGINT over itself
    quiet_agent()
    try:
        torchrun_main(argv)
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        if first.exitcode in SAID_EXITS:  # that worker said what happened, in one line
            return first.exitcode
        print(f"torchrun: {str(err).strip()}", file=sys.stderr, flush=True)
        return 1
    except SignalException as err:  # the agent itself was signalled; it passed the signal on and waited
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
