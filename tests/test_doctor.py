"""`distmnist doctor` on this machine, a real process each time: the report, exit 0 when nothing is wrong, 1 with
the problems listed, 2 for a bad command line (the two-node case, a hostname on 127.0.1.1, is in test_multinode)."""

from __future__ import annotations

import importlib.metadata
import socket
import subprocess
import sys
import time

from procs import child_env, free_port


def doctor(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "distmnist", "doctor", *args], env=child_env(**env),
                          capture_output=True, text=True, timeout=60)
    return proc, time.monotonic() - started


def problems(out: str) -> list[str]:
    return [line[4:] for line in out.split("\nproblems (", 1)[-1].splitlines()[1:] if line.startswith("  - ")]


def test_doctor_reports_this_machine_and_a_port_that_answers_exit_0():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        proc, elapsed = doctor("--endpoint", f"127.0.0.1:{port}")
    print(proc.stdout)
    print(f"doctor took {elapsed:.1f} s (the import of torch is most of it)")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name in ("torch", "lightning", "torchmetrics"):
        assert f"\n{name:<13} {importlib.metadata.version(name)}\n" in out, out
    assert f"python        {sys.version.split()[0]} " in out, out
    assert "backends      gloo: yes" in out, out
    assert f"hostname      {socket.gethostname()}" in out, out
    assert f"endpoint      127.0.0.1:{port} -> 127.0.0.1, this machine via lo (127.0.0.1)" in out, out
    assert f"port          {port} on 127.0.0.1: answers" in out, out
    assert "place         rank 0 of 1 " in out, out
    assert out.rstrip().endswith("problems: none found"), out
    assert proc.stderr == "", proc.stderr
    assert elapsed < 30, elapsed  # ~2-3 s here: torch's import


def test_doctor_lists_what_cannot_work_exit_1():
    """A closed port, an interface variable naming no interface, a rank outside the world: three problems."""
    port = free_port()  # bound and closed again: nothing listens
    proc, _ = doctor("--endpoint", f"127.0.0.1:{port}", GLOO_SOCKET_IFNAME="nosuch0", RANK="5", WORLD_SIZE="2",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    print(proc.stdout)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    found = problems(proc.stdout)
    assert f"problems ({len(found)}):" in proc.stdout, proc.stdout
    assert len(found) == 3, found
    assert found[0].startswith("GLOO_SOCKET_IFNAME=nosuch0: this machine has no interface 'nosuch0'"), found
    assert found[1].startswith(f"127.0.0.1:{port} (127.0.0.1) does not answer from here: connection refused"), found
    assert found[2] == "launcher variables: rank 5 is outside world size 2", found
    assert "launcher      MASTER_ADDR=127.0.0.1 " in proc.stdout and "RANK=5" in proc.stdout, proc.stdout


def test_doctor_bad_usage_is_one_line_exit_2():
    proc, _ = doctor("--endpoint", "node1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "", proc.stdout
    assert proc.stderr.splitlines() == [
        "distmnist doctor: error: --endpoint 'node1' is not HOST:PORT (a port 1-65535), e.g. node1:29500 "
        "(see distmnist doctor --help)"
    ], proc.stderr
