"""What this machine would bring to a job, as plain text for a bug report, and what in it cannot work.

    distmnist doctor [--endpoint HOST:PORT] [--wait S]

Versions (Python, torch, Lightning, torchmetrics), devices and backends (CUDA, NCCL, gloo), the hostname and what it
resolves to, the interfaces, and for the rendezvous endpoint (``--endpoint``, else MASTER_ADDR:MASTER_PORT when set):
the interface this node would take to reach it (core/network.py's choice, the one training makes) and whether the
port answers; then the launcher's variables (SLURM, torchrun) and the network ones. Exit 0 when nothing is wrong,
1 with the problems listed last, 2 for a bad command line. Lightning is not imported (its version is read from the
installed metadata): one machine's report takes about the time of torch's import.
"""

from __future__ import annotations

import errno
import importlib.metadata
import os
import platform
import socket
import sys
import time

from distmnist import __version__
from distmnist.core import network
from distmnist.core.args import Parser
from distmnist.core.errors import DistMnistError, NetworkUnusable

PACKAGES = ("torch", "lightning", "torchmetrics", "torchvision")
LAUNCHER_VARS = (
    "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
    "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE",
)
SLURM_VARS = (
    "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_CPUS_PER_TASK",
    "SLURM_GPUS_ON_NODE", "SLURM_RESTART_COUNT",
)
NETWORK_VARS = (*network.IFNAME_VARS, network.NO_PICK_VAR, "NCCL_IB_DISABLE", "NCCL_P2P_DISABLE", "NCCL_DEBUG",
                "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")


class Report:
    """Lines of `name  value`, and the problems found on the way."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.problems: list[str] = []

    def add(self, name: str, value: str) -> None:
        self.lines.append(f"{name:<13} {value}")

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def text(self) -> str:
        out = list(self.lines)
        if self.problems:
            out.append(f"problems ({len(self.problems)}):")
            out += [f"  - {p}" for p in self.problems]
        else:
            out.append("problems: none found")
        return "\n".join(out)


def versions(r: Report) -> None:
    r.add("distmnist", f"{__version__} ({os.path.dirname(os.path.dirname(__file__))})")
    r.add("python", f"{platform.python_version()} ({sys.executable})")
    r.add("platform", platform.platform())
    for name in PACKAGES:
        try:
            r.add(name, importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            r.add(name, "not installed")
            if name != "torchvision":
                r.problem(f"{name} is not installed in {sys.executable}")


def devices(r: Report) -> str:
    """CUDA and the process-group backends; the backend a training process here would use (nccl on CUDA)."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError as err:
        r.add("devices", f"torch does not import: {err}")
        r.problem(f"torch does not import: {err}")
        return "gloo"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        r.add("devices", f"CUDA {torch.version.cuda}: {len(names)} GPU{'s' if len(names) != 1 else ''} "
                         f"({', '.join(sorted(set(names)))})")
    else:
        build = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only torch build"
        r.add("devices", f"CPU only: no CUDA device visible ({build})")
    if not dist.is_available():
        r.add("backends", "torch.distributed is not available in this torch build")
        r.problem("torch.distributed is not available in this torch build: no multi-process training")
        return "gloo"
    nccl = "yes" if dist.is_nccl_available() else "no"
    if nccl == "yes" and torch.cuda.is_available():
        try:
            nccl = "NCCL " + ".".join(map(str, torch.cuda.nccl.version()))
        except (RuntimeError, AttributeError, TypeError):
            pass
    r.add("backends", f"gloo: {'yes' if dist.is_gloo_available() else 'no'}, nccl: {nccl}")
    if not dist.is_gloo_available():
        r.problem("gloo is not available in this torch build: CPU training needs it")
    return "nccl" if torch.cuda.is_available() else "gloo"


def host(r: Report) -> None:
    name, held = network.hostname_addresses()
    if not held:
        r.add("hostname", f"{name}: does not resolve")
    else:
        loop = " (loopback only)" if all(network.is_loopback(a) for a in held) else ""
        r.add("hostname", f"{name} -> {', '.join(held)}{loop}")
    held_by = network.addresses()
    r.add("interfaces", "; ".join(f"{n} {' '.join(a)}" for n, a in held_by.items() if a) or "none")
    known = set(held_by)
    for var in network.IFNAME_VARS:
        value = os.environ.get(var, "")
        # gloo: a comma-separated list of names; NCCL: prefixes, `=name` for an exact one, `^` to exclude
        if not value or value.startswith("^"):
            continue
        for item in value.split(","):
            exact = var.startswith("GLOO") or item.startswith("=")
            item = item.lstrip("=")
            if not any(k == item if exact else k.startswith(item) for k in known):
                r.problem(f"{var}={value}: this machine has no interface {item!r} (`ip -o addr` lists them)")


def parse_endpoint(text: str) -> tuple[str, int]:
    where, _, port = text.rpartition(":")
    where = where.strip("[]")
    if not where or not port.isdigit() or not 0 < int(port) < 2**16:
        raise ValueError(f"--endpoint {text!r} is not HOST:PORT (a port 1-65535), e.g. node1:29500")
    return where, int(port)


def knock(address: str, port: int, wait_s: float) -> str | None:
    """None when a TCP connection to address:port is accepted within wait_s, else why not."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(wait_s)
        try:
            s.connect((address, port))
            return None
        except TimeoutError:
            return f"no answer within {wait_s:g} s (a firewall, or a host that drops the packets)"
        except OSError as err:
            if err.errno == errno.ECONNREFUSED:
                return "connection refused (nothing listens there yet, or the wrong port)"
            return err.strerror or str(err)


def endpoint(r: Report, where: str, port: int, backend: str, wait_s: float) -> None:
    try:
        route = network.route_to(where)
    except network.Unreachable as err:
        r.add("endpoint", f"{where}:{port}: {err}")
        r.problem(f"endpoint {where}:{port}: {err}")
        return
    via = f"via {route.interface or '(no interface lists it)'} ({route.source})"
    if route.local:
        r.add("endpoint", f"{where}:{port} -> {route.address}, this machine {via}: a one-node job, distmnist sets "
                          f"no interface")
    else:
        # the choice a training process of a two-node job makes here, on a copy of the environment
        environ = {**os.environ, "MASTER_ADDR": where}
        try:
            choice = network.choose_interface(2, backend, environ)
            chosen = choice and ", ".join(f"{v}={x}{'' if v in choice.chosen else ' (yours)'}"
                                          for v, x in choice.settings)
            r.add("endpoint", f"{where}:{port} -> {route.address} {via}; a job spanning nodes sets "
                              f"{chosen or 'nothing'}")
        except NetworkUnusable as err:
            r.add("endpoint", f"{where}:{port} -> {route.address} {via}")
            r.problem(str(err))
        looped = network.loopback_hostname(route)
        if looped:
            r.problem(f"{looped}; distmnist sets GLOO_SOCKET_IFNAME={route.interface} itself, other programs "
                      f"(a plain torchrun script) need it exported")
    refused = knock(route.address, port, wait_s)
    r.add("port", f"{port} on {route.address}: {'answers' if refused is None else refused}")
    if refused is not None:
        r.problem(f"{where}:{port} ({route.address}) does not answer from here: {refused}; the rendezvous "
                  f"(torchrun's agent or rank 0 on the first node) serves it once the job starts")


def variables(r: Report) -> None:
    for title, names in (("launcher", LAUNCHER_VARS), ("slurm", SLURM_VARS), ("network", NETWORK_VARS)):
        seen = [f"{n}={os.environ[n]}" for n in names if n in os.environ]
        r.add(title, " ".join(seen) or "(none set)")
    try:
        from distmnist.core import dist

        env = dist.read_env()
        r.add("place", f"rank {env.rank} of {env.world_size} (local rank {env.local_rank}, node rank "
                       f"{env.node_rank}, launcher {env.launcher}, {env.num_nodes} node{'s' * (env.num_nodes > 1)})")
    except DistMnistError as err:
        r.problem(f"launcher variables: {err}")


def report(endpoint_text: str | None, wait_s: float) -> Report:
    r = Report()
    started = time.monotonic()
    versions(r)
    backend = devices(r)
    host(r)
    if endpoint_text is None and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT", "").isdigit():
        endpoint_text = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if endpoint_text is None:
        r.add("endpoint", "none given (--endpoint HOST:PORT, or MASTER_ADDR and MASTER_PORT)")
    else:
        endpoint(r, *parse_endpoint(endpoint_text), backend, wait_s)
    variables(r)
    r.add("took", f"{time.monotonic() - started:.1f} s")
    return r


def parser() -> Parser:
    p = Parser(prog="distmnist doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", metavar="HOST:PORT",
                   help="the rendezvous (torchrun --rdzv-endpoint, MASTER_ADDR:MASTER_PORT); default: those variables")
    p.add_argument("--wait", type=float, default=2.0, metavar="S",
                   help="how long to wait for the endpoint's port to answer (default: 2)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.endpoint is not None:
        try:
            parse_endpoint(args.endpoint)
        except ValueError as err:
            p.error(str(err))
    if not args.wait > 0:
        p.error(f"--wait {args.wait:g} must be more than 0")
    r = report(args.endpoint, args.wait)
    print(r.text(), flush=True)
    return 1 if r.problems else 0


if __name__ == "__main__":
    sys.exit(main())
