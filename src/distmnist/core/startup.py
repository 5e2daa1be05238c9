"""Start-up: every rank checks in through the launcher's store before the process group is built.

Each rank that came says, within ``dist.startup_timeout_s``, which ranks (and on SLURM which nodes) are missing
(``StartupIncomplete``, exit 69), instead of every rank hanging in ``init_process_group``; and the store the group
gets is prefixed with a key of this start alone (why: below). Used by ``core/dist.init_process_group``.
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING

import torch.distributed as dist

from distmnist.core import network
from distmnist.core.errors import DistMnistError, StartupIncomplete

if TYPE_CHECKING:
    from distmnist.core.dist import DistEnv


# ---- start-up: who came, and a store namespace of this start alone ------------------------------------------------
#
# Why a namespace per start: torchrun (torch >= 2.4, unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) hands its workers
# the TCPStore server its rendezvous created once, on the first round, and reuses it for every --max-restarts
# attempt (DynamicRendezvousHandler.next_rendezvous keeps `_shared_tcp_store_server`; the workers get
# TORCHELASTIC_USE_AGENT_STORE=True and the same MASTER_ADDR:MASTER_PORT each time). env:// then gives every attempt
# the same store with the same keys ("default_pg/0/..."), and a restarted rank can read the dead attempt's gloo
# addresses and counters before the live peer overwrites them: connects to dead peers until the timeout, or
# waits on counters that are already past (pytorch/pytorch#135712). TORCHELASTIC_RESTART_COUNT cannot name the
# attempt: an agent counts only its own workers' failures (a node restarted because another node failed keeps its
# count), so two nodes may disagree. What every attempt has for sure: the previous attempt's workers were all
# stopped before any of this attempt's started (each agent stops its workers before it joins the next round).
# So rank 0 draws a fresh random key and gives it to each rank in answer to a nonce that rank drew itself: an answer
# to a nonce is never stale, whatever else is left in the store.

_PREFIX = "distmnist/startup"
_POLL_S = 0.05


def agreed_store(env: DistEnv, startup_timeout_s: float) -> tuple[dist.Store, str | None]:
    """The launcher's store, prefixed with a key that every rank of this start got from rank 0 (see above); and,
    for a rank whose MASTER_ADDR resolves to loopback while the other hosts resolve it to an address, that
    address (see _agree), else None."""
    where = _endpoint()
    base = _connect(env, where, startup_timeout_s)
    started = time.monotonic()
    try:
        key, master_elsewhere = _agree(base, env, startup_timeout_s, where)
    except StartupIncomplete:
        raise
    except RuntimeError as err:  # the store went away: rank 0 gave up, or the network did
        raise StartupIncomplete(
            f"start-up failed: rank {env.rank} lost the store at {where} after {time.monotonic() - started:.0f} s "
            f"({_first_line(err)}): rank 0 stopped or {where} is not reachable from {socket.gethostname()}; "
            f"{_CHECK}"
        ) from None
    return dist.PrefixStore(f"distmnist/{key}/", base), master_elsewhere


_CHECK = ("check that every node was started (torchrun --nnodes, srun --nodes/--ntasks), that MASTER_ADDR:MASTER_PORT "
          "is reachable from every node (firewall) and the missing processes' own logs")


def _endpoint() -> str:
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise DistMnistError(
                f"{var} is not set: launch with torchrun (it sets it) or export {var} in the batch script"
            )
    raw = os.environ["MASTER_PORT"]
    try:
        port = int(raw)
    except ValueError:
        raise DistMnistError(f"environment variable MASTER_PORT={raw!r} is not an integer") from None
    if not 0 < port < 2**16:
        raise DistMnistError(f"environment variable MASTER_PORT={port} is not a TCP port (1-65535)")
    return f"{os.environ['MASTER_ADDR']}:{port}"


def _connect(env: DistEnv, where: str, startup_timeout_s: float) -> dist.TCPStore:
    """A client of torchrun's store (it serves one at MASTER_ADDR:MASTER_PORT: TORCHELASTIC_USE_AGENT_STORE), or
    else rank 0 serves it -- without waiting for the others in its constructor: the wait is ours, and says who
    is missing."""
    host, port = where.rsplit(":", 1)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    serve = not agent and env.rank == 0
    try:
        return dist.TCPStore(
            host, int(port), world_size=env.world_size, is_master=serve,
            timeout=timedelta(seconds=startup_timeout_s), wait_for_workers=False, multi_tenant=True,
        )
    except RuntimeError as err:
        if serve:
            raise StartupIncomplete(
                f"start-up failed: rank 0 cannot serve the store at {where} ({_first_line(err)}): is the port free "
                f"on {socket.gethostname()}, is MASTER_ADDR an address of this node?"
            ) from None
        server = "torchrun's agent on the first node" if agent else "rank 0"
        raise StartupIncomplete(
            f"start-up incomplete: rank {env.rank} of {env.world_size} (on {socket.gethostname()}) could not reach "
            f"the store at {where} within dist.startup_timeout_s={startup_timeout_s:g} s ({_first_line(err)}); "
            f"{server} serves it: is it running, is {where} reachable from this node (firewall)? {_CHECK}"
        ) from None


def _agree(store: dist.Store, env: DistEnv, startup_timeout_s: float, where: str) -> tuple[str, str | None]:
    """This start's key, from rank 0, once every rank has checked in; else StartupIncomplete on every rank that came.

    rank r > 0: publish a fresh nonce at hello/r, wait for answer/<nonce> (rank 0's key), check in under
    <key>/host/r (its hostname and what MASTER_ADDR resolves to there), wait for <key>/outcome ("go", or the line
    that says who is missing).
    rank 0: answer every nonce it sees at hello/r until all ranks checked in under <key> or the time is up; before
    "go", <key>/master: the address the hosts that do not resolve MASTER_ADDR to loopback see, where other hosts
    do (the rendezvous node's own /etc/hosts mapping its name to 127.0.1.1): their gloo must listen on it.
    """
    host = socket.gethostname()
    seen_here = _master_seen()
    deadline = time.monotonic() + startup_timeout_s
    if env.rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"{_PREFIX}/hello/{env.rank}", nonce)
        if not _wait(store, f"{_PREFIX}/answer/{nonce}", startup_timeout_s):
            raise StartupIncomplete(
                f"start-up incomplete: rank 0 did not check in within dist.startup_timeout_s={startup_timeout_s:g} s "
                f"(rank {env.rank} of {env.world_size} waited on {host}, store {where}): rank 0's node is missing "
                f"or slow; {_CHECK}"
            )
        key = store.get(f"{_PREFIX}/answer/{nonce}").decode()
        store.set(f"{_PREFIX}/{key}/host/{env.rank}", f"{host}\t{seen_here}")
        # rank 0 decides within startup_timeout_s of its own start, which came before its answer
        if not _wait(store, f"{_PREFIX}/{key}/outcome", startup_timeout_s + 30):
            raise StartupIncomplete(f"start-up incomplete: rank 0 (store {where}) stopped answering; {_CHECK}")
        outcome = store.get(f"{_PREFIX}/{key}/outcome").decode()
        if outcome != "go":
            store.add(f"{_PREFIX}/{key}/told", 1)
            raise StartupIncomplete(outcome)
        return key, _master_elsewhere(store, key, seen_here)

    key = uuid.uuid4().hex
    hosts, answered, seen = {0: host}, {}, {0: seen_here}
    waiting = set(range(1, env.world_size))
    while waiting:
        for r in sorted(waiting):
            hello = f"{_PREFIX}/hello/{r}"
            if store.check([hello]):
                nonce = store.get(hello).decode()
                if answered.get(r) != nonce:  # a nonce of an earlier start is answered too: nobody reads that answer
                    store.set(f"{_PREFIX}/answer/{nonce}", key)
                    answered[r] = nonce
            came = f"{_PREFIX}/{key}/host/{r}"
            if store.check([came]):
                hosts[r], seen[r] = store.get(came).decode().split("\t", 1)
                waiting.discard(r)
        if not waiting or time.monotonic() > deadline:
            break
        time.sleep(_POLL_S)
    if not waiting:
        looped = {hosts[r] for r, a in seen.items() if network.is_loopback(a)}
        elsewhere = sorted({a for r, a in seen.items() if a and not network.is_loopback(a) and hosts[r] not in looped})
        if looped and elsewhere:
            store.set(f"{_PREFIX}/{key}/master", elsewhere[0])
        store.set(f"{_PREFIX}/{key}/outcome", "go")
        return key, _master_elsewhere(store, key, seen_here)
    line = _missing_line(env, hosts, sorted(waiting), startup_timeout_s, where)
    store.set(f"{_PREFIX}/{key}/outcome", line)
    told_by = time.monotonic() + 5  # keep serving the store until the others read the line (when rank 0 serves it)
    while store.add(f"{_PREFIX}/{key}/told", 0) < len(hosts) - 1 and time.monotonic() < told_by:
        time.sleep(_POLL_S)
    raise StartupIncomplete(line)


def _master_seen() -> str:
    """What MASTER_ADDR resolves to on this host (its first address), "" when it does not resolve."""
    found = network.resolve(os.environ.get("MASTER_ADDR", ""))
    return found[0] if found else ""


def _master_elsewhere(store: dist.Store, key: str, seen_here: str) -> str | None:
    """For a rank whose MASTER_ADDR is loopback: the address the other hosts see, if rank 0 published one."""
    if not network.is_loopback(seen_here) or not store.check([f"{_PREFIX}/{key}/master"]):
        return None
    return store.get(f"{_PREFIX}/{key}/master").decode()


def _wait(store: dist.Store, key: str, timeout_s: float) -> bool:
    try:
        store.wait([key], timedelta(seconds=max(timeout_s, 0.001)))
        return True
    except RuntimeError as err:
        if "timeout" in str(err).lower() or "timed out" in str(err).lower():
            return False
        raise


def _missing_line(env: DistEnv, hosts: dict[int, str], missing: list[int], timeout_s: float, where: str) -> str:
    arrived = sorted(hosts)
    on = sorted(set(hosts.values()))
    nodes = []
    if env.launcher == "torchrun" and env.local_world_size < env.world_size:  # torchrun: ranks are blocks per node
        silent = sorted({r // env.local_world_size for r in missing} - {r // env.local_world_size for r in arrived})
        if silent:
            nodes.append(f"node rank{'s' if len(silent) > 1 else ''} {_ranges(silent)} (torchrun GROUP_RANK)")
    names = _hostnames(os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or "")
    short = {h.split(".")[0] for h in on}
    absent = [n for n in names if n.split(".")[0] not in short]
    if absent:
        nodes.append(f"no process from node{'s' if len(absent) > 1 else ''} {','.join(absent)} (SLURM_JOB_NODELIST)")
    return (
        f"start-up incomplete: {len(arrived)} of {env.world_size} processes reached the process group within "
        f"dist.startup_timeout_s={timeout_s:g} s; missing: rank{'s' if len(missing) > 1 else ''} {_ranges(missing)}"
        + (f", {'; '.join(nodes)}" if nodes else "")
        + f"; arrived: rank{'s' if len(arrived) > 1 else ''} {_ranges(arrived)} on {','.join(on)}; store {where}; "
        + _CHECK
    )


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'"""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(out)


def _hostnames(nodelist: str) -> list[str]:
    """SLURM's host list expression, one bracket group per name: 'n[01-03,7],gpu5' -> n01 n02 n03 n07 gpu5."""
    names = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)?", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not m:
            names.append(item)
            continue
        for part in m.group(2).split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                return []  # not understood: say nothing rather than something wrong
            for n in range(int(lo), int(hi or lo) + 1):
                names.append(f"{m.group(1)}{n:0{len(lo)}d}{m.group(3)}")
    return names


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return " ".join(text.splitlines()[0].split())[:160] if text else type(err).__name__
