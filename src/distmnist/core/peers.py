"""A rank's known failure said where the others are: through the job's store, before the rank exits.

A rank that stops on a known error (a DistMnistError it met alone: bad data on its node, a config or environment
problem; a divergence) writes its one line, host and rank into the job's store (the c10d TCPStore of this start:
torchrun's, or rank 0's; core/startup.agreed_store's prefix, so a restarted job never reads the last attempt's). A rank
whose collective then fails looks there and says "rank R on HOST stopped: <its line>" instead of "lost its peers".
Bounded: where nothing is written (kill -9, OOM), or the store is gone with its host, the look ends within
LOOK_S and the lost-peers line stands.
"""

from __future__ import annotations

import json
import socket
import time
from datetime import timedelta

from distmnist.core.errors import PeerStopped, collective_failure, known_line

_KEY = "distmnist/stopped"
# how long a rank whose collective failed looks for a peer's word: the peer writes it before it destroys its process
# group (which is what makes the collective fail), so it is there at once; this bounds the look where it is not
LOOK_S = 3.0
_POLL_S = 0.05

_job: tuple | None = None  # (store, rank, host) of this process's job, set by core/dist.init_process_group


def attach(store, rank: int) -> None:
    global _job
    _job = (store, rank, socket.gethostname())


def detach() -> None:
    global _job
    _job = None


def tell(line: str) -> None:
    """Write this rank's line into the job's store (nothing where there is no job, or the store is gone)."""
    if _job is None:
        return
    store, rank, host = _job
    try:
        store.set_timeout(timedelta(seconds=LOOK_S))
        index = store.add(f"{_KEY}/n", 1) - 1
        store.set(f"{_KEY}/{index}", json.dumps({"rank": rank, "host": host, "line": line}))
    except (RuntimeError, OSError):  # the store went with its host: the others give the lost-peers line
        pass


def stopped(look_s: float = LOOK_S) -> list[dict]:
    """The other ranks' words in the store, waiting up to look_s for one; [] when none came or the store is gone."""
    if _job is None:
        return []
    store, rank, _ = _job
    deadline = time.monotonic() + look_s
    try:
        store.set_timeout(timedelta(seconds=look_s))
        while True:
            count = store.add(f"{_KEY}/n", 0)
            keys = [f"{_KEY}/{i}" for i in range(count)]
            found = [json.loads(store.get(k)) for k in keys if store.check([k])]
            found = [f for f in found if f["rank"] != rank]
            if found or time.monotonic() > deadline:
                return sorted(found, key=lambda f: f["rank"])
            time.sleep(_POLL_S)
    except (RuntimeError, OSError, ValueError):
        return []


def said(words: list[dict]) -> str:
    first, others = words[0], sorted({w["rank"] for w in words[1:]} - {words[0]["rank"]})
    also = f" (rank{'s' if len(others) > 1 else ''} {','.join(map(str, others))} too)" if others else ""
    return f"rank {first['rank']} on {first['host']} stopped: {first['line']}{also}"


def after(err: BaseException) -> BaseException:
    """What this rank raises for `err` that ends its part of the job: a known error is told to the others first (and
    raised as it is); a collective that lost its peers becomes PeerStopped where a peer left its word."""
    line = known_line(err)
    if line is not None:
        tell(line)
        return err
    if collective_failure(err) is None:
        return err
    words = stopped()
    return PeerStopped(said(words)) if words else err


def raise_told(err: BaseException):
    """Re-raise `err`, which ends this rank's part of the job, once the peers were told (see after). Called before
    destroy_process_group: its closing of the connections is what fails the others' collectives."""
    named = after(err)
    if named is err:
        raise err
    raise named from None
