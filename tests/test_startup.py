"""Start-up that explains itself: when not every process of the job reaches the process group within
dist.startup_timeout_s, every process that came exits 69 with one line naming the missing ranks (and nodes, where
the launcher tells) -- instead of waiting dist.timeout_s, or gloo's 30 minutes, for a process that never comes."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from procs import child_env, free_port

from distmnist.core import startup
from distmnist.core.config import load_config
from distmnist.core.errors import STARTUP_EXIT, DistMnistError

STARTUP_S = 3
# dist.timeout_s long: a start-up that fell back on it (or on torch's own waits) would blow the bound below
ARGS = ("-c", "smoke", f"dist.startup_timeout_s={STARTUP_S}", "dist.timeout_s=600")


def start_some(tmp: Path, who: dict[int, str], world: int, env_of) -> tuple[list[subprocess.Popen], float]:
    """Start the ranks in `who` (rank -> strategy) of a job of `world` processes; return them and the moment rank 0
    reached the start-up (its store's port answers: rank 0 serves it when no torchrun agent does)."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", f"distmnist.{strategy}", *ARGS, f"run.dir={tmp / f'run{rank}'}"],
            cwd=tmp, env=child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env_of(rank, world)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank, strategy in who.items()
    ]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return procs, time.monotonic()
        except OSError:
            time.sleep(0.05)
    for p in procs:
        p.kill()
    raise AssertionError(f"rank 0 never served its store: {[p.communicate()[1][-2000:] for p in procs]}")


def finish(procs: list[subprocess.Popen], arrived: float) -> tuple[list[tuple[int, str]], float, float]:
    """Their exit codes and stderr; how long after rank 0's arrival the last first line came, and the last exit
    (which includes the interpreter's teardown of torch and Lightning: seconds, more on a loaded machine)."""
    first_line_at: dict[int, float] = {}
    err: dict[int, list[str]] = {i: [] for i in range(len(procs))}

    def read(i: int, p: subprocess.Popen) -> None:
        for line in p.stderr:
            first_line_at.setdefault(i, time.monotonic())
            err[i].append(line)

    readers = [threading.Thread(target=read, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in readers:
        t.start()
    deadline = arrived + STARTUP_S + 120
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    exited = time.monotonic() - arrived
    for p, t in zip(procs, readers, strict=True):
        if p.poll() is None:
            p.kill()
        p.wait()
        t.join(timeout=10)
        p.stdout.close()
    said = max(first_line_at.values(), default=time.monotonic()) - arrived
    return [(p.returncode, "".join(err[i])) for i, p in enumerate(procs)], said, exited


def torchrun_env(rank: int, world: int) -> dict[str, str]:
    """What torchrun gives a worker on the first of two nodes (2 processes per node), in a SLURM allocation."""
    return dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % 2), LOCAL_WORLD_SIZE="2",
                GROUP_RANK=str(rank // 2), SLURM_JOB_NODELIST=f"{socket.gethostname()},ghost1")


def srun_env(rank: int, world: int) -> dict[str, str]:
    """What srun gives one task of `world` (one task per process, the Trainer's SLURM layout)."""
    return dict(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                SLURM_STEP_ID="0", SLURM_JOB_NUM_NODES="1")


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_half_of_a_two_node_job_names_the_missing_node(tmp_path):
    """torchrun's layout on node 1 of 2 (ranks 0-1 here, ranks 2-3 never come): the Fabric and the Trainer process
    (the two Lightning paths into the process group) both exit 69 with the one line."""
    procs, arrived = start_some(tmp_path, {0: "fabric", 1: "trainer"}, 4, torchrun_env)
    results, said, exited = finish(procs, arrived)
    print(f"\nthe line came {said:.1f} s after rank 0 reached the start-up (dist.startup_timeout_s={STARTUP_S}), "
          f"the processes were gone after {exited:.1f} s")
    for code, stderr in results:
        line = one_line(stderr)
        assert code == STARTUP_EXIT, stderr[-3000:]
        assert line.startswith("distmnist: error: start-up incomplete: 2 of 4 processes"), line
        assert "missing: ranks 2-3, node rank 1 (torchrun GROUP_RANK); no process from node ghost1" in line, line
        assert f"arrived: ranks 0-1 on {socket.gethostname()}" in line, line
        assert "MASTER_ADDR:MASTER_PORT is reachable from every node" in line and "--nnodes" in line, line
    assert said < STARTUP_S + 15, said  # then each one exits (69 above: not killed at finish's deadline)
    assert not list(tmp_path.glob("run*/model.pt"))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_of_three_srun_tasks_name_rank_2(tmp_path):
    procs, arrived = start_some(tmp_path, {0: "ddp", 1: "ddp"}, 3, srun_env)
    results, said, exited = finish(procs, arrived)
    print(f"\nthe line came {said:.1f} s after rank 0 reached the start-up (dist.startup_timeout_s={STARTUP_S}), "
          f"the processes were gone after {exited:.1f} s")
    for code, stderr in results:
        line = one_line(stderr)
        assert code == STARTUP_EXIT, stderr[-3000:]
        assert "start-up incomplete: 2 of 3 processes reached the process group" in line, line
        assert "missing: rank 2;" in line, line
    assert said < STARTUP_S + 15, said  # then each one exits (69 above: not killed at finish's deadline)


def test_rank_ranges_and_slurm_host_lists():
    assert startup._ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert startup._ranges([3]) == "3"
    assert startup._hostnames("n[01-03,07],gpu5,rack[8]x") == ["n01", "n02", "n03", "n07", "gpu5", "rack8x"]
    assert startup._hostnames("node1") == ["node1"]
    assert startup._hostnames("n[a-b]") == []  # not understood: no node names rather than wrong ones


def test_startup_timeout_is_its_own_key():
    assert load_config(None, ["dist.startup_timeout_s=20"]).dist.startup_timeout_s == 20
    assert load_config(None, []).dist.startup_timeout_s < load_config(None, []).dist.timeout_s
    with pytest.raises(DistMnistError, match="dist.startup_timeout_s"):
        load_config(None, ["dist.startup_timeout_s=0"])


def test_the_interface_choice_on_this_machine(capsys, monkeypatch):
    """core/network on loopback only (the two-node cases are in test_multinode): one node and a loopback MASTER_ADDR
    (several agents on one machine) change nothing; a MASTER_ADDR that does not resolve (the resolver stubbed: no
    DNS query leaves this machine) in a two-node job is one line, exit 69, said by local rank 0 alone."""
    from distmnist.core import network
    from distmnist.core.errors import NetworkUnusable, report_errors

    for nodes, master in ((1, "127.0.0.1"), (2, "127.0.0.1"), (2, "localhost")):
        environ = {"MASTER_ADDR": master}
        assert network.choose_interface(nodes, "gloo", environ) is None and environ == {"MASTER_ADDR": master}
    route = network.route_to("127.0.0.1")
    assert (route.address, route.source, route.interface, route.local) == ("127.0.0.1", "127.0.0.1", "lo", True)
    resolve = network.resolve
    monkeypatch.setattr(network, "resolve", lambda host: [] if host == "nosuch.invalid" else resolve(host))
    assert network.choose_interface(1, "gloo", {"MASTER_ADDR": "nosuch.invalid"}) is None  # one node: as before
    with pytest.raises(NetworkUnusable, match="nosuch.invalid does not resolve"):
        network.choose_interface(2, "gloo", {"MASTER_ADDR": "nosuch.invalid"})

    @report_errors
    def main():
        network.choose_interface(2, "gloo", {"MASTER_ADDR": "nosuch.invalid"})

    for local, said in (("0", 1), ("1", 0)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LOCAL_RANK", local)
            assert main() == STARTUP_EXIT
        assert capsys.readouterr().err.count("distmnist: error: network: nosuch.invalid") == said
