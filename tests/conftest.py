"""Shared fixtures."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SLURM_SCRIPTS = Path(__file__).resolve().parent / "slurm"


@dataclass(frozen=True)
class SlurmCluster:
    """The one-node SLURM cluster on localhost started by tests/slurm/start_cluster.sh."""

    conf: str  # SLURM_CONF of the cluster: every sbatch/squeue/scancel call needs it

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = self.conf
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        return env

    def on(self, node: str, *cmd: str) -> list[str]:
        """The command line that runs cmd on node: the one node is this machine."""
        return [*map(str, cmd)]


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the test cluster once per session (skip where this machine cannot run one), stop it at the end."""
    started = time.monotonic()
    try:
        proc = subprocess.run(
            ["bash", str(SLURM_SCRIPTS / "start_cluster.sh")],
            capture_output=True, text=True, timeout=600,
        )
    except subprocess.TimeoutExpired as err:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop_cluster.sh")], capture_output=True, timeout=120)
        pytest.fail(f"tests/slurm/start_cluster.sh did not finish in {err.timeout:.0f} s")
    if proc.returncode == 3:
        reason = (proc.stderr.strip().splitlines() or ["start_cluster.sh exited 3"])[-1]
        pytest.skip(reason)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0 or not last.startswith("export SLURM_CONF="):
        pytest.fail(
            f"tests/slurm/start_cluster.sh failed (exit {proc.returncode})\n--- stdout\n{proc.stdout[-2000:]}\n"
            f"--- stderr\n{proc.stderr[-6000:]}"
        )
    cluster = SlurmCluster(conf=last.split("=", 1)[1].strip())
    print(f"\nSLURM test cluster up in {time.monotonic() - started:.1f} s ({cluster.conf})")
    try:
        yield cluster
    finally:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop_cluster.sh")], capture_output=True, timeout=120)


# ------------------------------------------------------------------------------------------- two-node cluster
CLUSTER_SCRIPTS = Path(__file__).resolve().parent / "cluster"


@dataclass(frozen=True)
class TwoNodeCluster:
    """The two hosts node1, node2 (network namespaces) with SLURM, built by tests/cluster/start.sh. It runs beside
    the one-node cluster (slurm_cluster): its own state folder, its own SLURM_CONF, daemons inside the namespaces."""

    conf: str  # SLURM_CONF: every sbatch/squeue/scancel call needs it
    dir: Path  # CLUSTER_TEST_DIR

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = self.conf
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        return env

    def on(self, node: str, *cmd: str) -> list[str]:
        """The command line that runs cmd on node (its network, hostname and /etc/hosts; see tests/cluster/on)."""
        return ["bash", str(CLUSTER_SCRIPTS / "on"), node, *map(str, cmd)]

    @property
    def local(self) -> Path:
        """The node-local disk: this path is a different folder on each node."""
        return self.dir / "local"

    def local_of(self, node: str) -> Path:
        """Where node's local disk lives, seen from this machine."""
        return self.dir / "nodes" / node


@pytest.fixture(scope="session")
def two_node_cluster():
    """Build the two-node cluster once per session (skip where namespaces cannot be made), tear it down at the end."""
    started = time.monotonic()
    stop = ["bash", str(CLUSTER_SCRIPTS / "stop.sh")]
    try:
        proc = subprocess.run(["bash", str(CLUSTER_SCRIPTS / "start.sh")], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as err:
        subprocess.run(stop, capture_output=True, timeout=120)
        pytest.fail(f"tests/cluster/start.sh did not finish in {err.timeout:.0f} s")
    if proc.returncode == 3:
        pytest.skip((proc.stderr.strip().splitlines() or ["tests/cluster/start.sh exited 3"])[-1])
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0 or not last.startswith("export SLURM_CONF="):
        subprocess.run(stop, capture_output=True, timeout=120)
        pytest.fail(f"tests/cluster/start.sh failed (exit {proc.returncode})\n--- stdout\n{proc.stdout[-2000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}")
    conf = last.split("=", 1)[1].strip()
    cluster = TwoNodeCluster(conf=conf, dir=Path(conf).parent)
    print(f"\ntwo-node test cluster up in {time.monotonic() - started:.1f} s ({cluster.conf})")
    try:
        yield cluster
    finally:
        subprocess.run(stop, capture_output=True, timeout=120)
