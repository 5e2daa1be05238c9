"""Real processes for the tests: torchrun launches with a free port, plain `python -m` runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    for key in [k for k in env if k.startswith(("SLURM_", "TORCHELASTIC_")) or k in ("RANK", "WORLD_SIZE")]:
        env.pop(key)
    env.update(extra)
    return env


def run_module(module: str, *args: str, cwd: Path, timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """`python -m module args...` in one process."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd, env=child_env(**env), capture_output=True, text=True, timeout=timeout,
    )


def torchrun(module: str, *args: str, nproc: int = 2, cwd: Path, timeout: float = 240, extra: tuple = (),
             **env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=N -m module args...` on a free port (gloo on CPU)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", *extra, "-m", module, *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=child_env(**env), capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "model.pt", map_location="cpu", weights_only=True)


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
