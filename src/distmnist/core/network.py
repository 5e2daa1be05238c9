"""Which network interface this process's gloo / NCCL traffic takes, decided before the process group comes up.

Without ``GLOO_SOCKET_IFNAME`` gloo binds to the address this node's hostname resolves to: on a default Debian or
Ubuntu install that is 127.0.1.1 (loopback), and the other nodes are refused (pytorch#8672, gloo#367). NCCL
without ``NCCL_SOCKET_IFNAME`` takes the first interface that is not loopback, which need not reach the others.
So in a job that spans nodes each process asks the kernel which of its addresses routes to the rendezvous host
(``MASTER_ADDR``: a UDP ``connect()`` sends nothing, ``getsockname()`` then names the source address, what
``ip route get`` prints), and sets both variables to the interface that holds it. The user's variables always win;
on one node nothing changes. ``DISTMNIST_NO_IFNAME_PICK=1`` switches the choice off (the refusals of what cannot
work stay: see choose_interface).
No torch here: a tool that reports the network (a ``doctor``) can use these functions without it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
import subprocess
from dataclasses import dataclass

from distmnist.core.errors import NetworkUnusable

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
NO_PICK_VAR = "DISTMNIST_NO_IFNAME_PICK"
# ioctl(2) request for an interface's (primary) IPv4 address: linux/sockios.h
_SIOCGIFADDR = 0x8915
_FIX = ("set GLOO_SOCKET_IFNAME (gloo) or NCCL_SOCKET_IFNAME (NCCL) to the interface that reaches the other nodes "
        "(`ip -o addr` lists them)")


class Unreachable(Exception):
    """The host does not resolve, or no interface of this machine routes to it; the message says which."""


@dataclass(frozen=True)
class Route:
    host: str  # as given
    address: str  # what it resolved to
    source: str  # this machine's address towards it (the kernel's choice)
    interface: str | None  # the interface holding `source`, None where no interface lists it

    @property
    def local(self) -> bool:
        """The host is this machine (one of its addresses, loopback included)."""
        return self.source == self.address or is_loopback(self.address)


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def resolve(host: str) -> list[str]:
    """host's addresses in the resolver's order (IPv4 and IPv6); [] when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return list(dict.fromkeys(info[4][0] for info in infos))


def route_to(host: str) -> Route:
    """The address and interface this machine sends from to reach host (the first address of host that routes)."""
    addresses = resolve(host)
    if not addresses:
        raise Unreachable(f"{host} does not resolve to an address on {socket.gethostname()}")
    errors = []
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                # UDP connect: the kernel picks the route and the source address, and nothing is sent
                s.connect((address, 9))
                source = s.getsockname()[0]
            except OSError as err:
                errors.append(f"{address}: {err.strerror or err}")
                continue
        return Route(host, address, source, interface_of(source))
    raise Unreachable(f"no interface of {socket.gethostname()} reaches {host} ({'; '.join(errors)})")


def addresses() -> dict[str, list[str]]:
    """{interface: its addresses}, IPv4 (the primary address, from ioctl) then IPv6 (/proc/net/if_inet6)."""
    found: dict[str, list[str]] = {name: [] for _, name in socket.if_nameindex()}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in found:
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address
                continue
            found[name].append(socket.inet_ntoa(packed[20:24]))
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr, *_, name = line.split()
                found.setdefault(name, []).append(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    except OSError:
        pass
    return found


def interface_of(address: str) -> str | None:
    """The interface that holds address; `ip -o addr` where ioctl sees only each interface's primary address."""
    for name, held in addresses().items():
        if address in held:
            return name
    try:
        out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[3].split("/")[0] == address:
            return fields[1].split("@")[0]
    return None


def hostname_addresses() -> tuple[str, list[str]]:
    host = socket.gethostname()
    return host, resolve(host)


def loopback_hostname(route: Route) -> str | None:
    """What goes wrong when this node's hostname resolves only to loopback (/etc/hosts' 127.0.1.1), or not at all
    (gloo then takes the loopback address: ProcessGroupGloo::createDefaultDevice), and route.host is another machine:
    gloo without GLOO_SOCKET_IFNAME listens there and the other nodes are refused; None when the hostname has an
    address that is not loopback, or route.host is this machine."""
    host, held = hostname_addresses()
    if route.local or any(not is_loopback(a) for a in held):
        return None
    said = f"resolves to the loopback address {held[0]} (/etc/hosts)" if held else \
        "does not resolve (gloo then takes the loopback address)"
    mine = route.interface or route.source
    return (f"this node's hostname {host} {said} while MASTER_ADDR={route.host} is another machine: gloo would listen "
            f"there and the other nodes could not connect; map {host} to the address of {mine} ({route.source})")


@dataclass(frozen=True)
class Choice:
    route: Route
    chosen: tuple[str, ...]  # the variables this process set
    settings: tuple[tuple[str, str], ...]  # every *_SOCKET_IFNAME now set, the user's and ours

    def line(self) -> str:
        r = self.route
        said = ", ".join(f"{var}={value}{'' if var in self.chosen else ' (yours)'}" for var, value in self.settings)
        return (f"distmnist: {socket.gethostname()}: network interface {r.interface} ({r.source}) reaches "
                f"MASTER_ADDR={r.host} ({r.address}); {said}")


def picking(environ=os.environ) -> bool:
    return environ.get(NO_PICK_VAR, "").lower() not in ("1", "true", "yes")


def choose_interface(num_nodes: int, backend: str, environ=os.environ) -> Choice | None:
    """Set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME (those the user left unset) in environ to the interface that
    routes to MASTER_ADDR, when the job spans nodes or MASTER_ADDR is another machine; None when nothing is set.
    Nothing is chosen when MASTER_ADDR is loopback here: then every process that can reach it runs on this machine
    (several torchrun agents on one machine), where the defaults work. NetworkUnusable (exit 69) for what cannot
    work, before any store or collective:

    - MASTER_ADDR does not resolve, or no interface routes to it, in a job that spans nodes;
    - MASTER_ADDR is another machine and gloo has no GLOO_SOCKET_IFNAME (the switch off) while this node's hostname
      resolves only to loopback (/etc/hosts' 127.0.1.1): gloo would listen there, and the others be refused.
    """
    master = environ.get("MASTER_ADDR", "")
    if not master:
        return None
    spans = num_nodes > 1
    try:
        route = route_to(master)
    except Unreachable as err:
        if not spans:  # one node: the store's own error, as before
            return None
        raise NetworkUnusable(f"network: {err}; MASTER_ADDR={master} must name the rendezvous node by a name "
                              f"or address every node resolves and reaches") from None
    if (not spans and route.local) or is_loopback(route.address):
        return None
    mine = {var for var in IFNAME_VARS if environ.get(var)}
    backend_var = "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"
    unset = tuple(var for var in IFNAME_VARS if var not in mine)
    chosen: tuple[str, ...] = ()
    if picking(environ) and unset and (route.interface is not None or backend_var not in mine):
        if route.interface is None:
            raise NetworkUnusable(f"network: no interface of {socket.gethostname()} holds {route.source}, the "
                                  f"address that routes to {master} ({route.address}); {_FIX}")
        chosen = unset
        for var in chosen:
            environ[var] = route.interface
    if not route.local and backend == "gloo" and not environ.get("GLOO_SOCKET_IFNAME"):
        looped = loopback_hostname(route)
        if looped:
            raise NetworkUnusable(f"network: {looped}; unset {NO_PICK_VAR}, or {_FIX}")
    settings = tuple((var, environ[var]) for var in IFNAME_VARS if environ.get(var))
    return Choice(route, chosen, settings) if settings else None


def choose_on_the_master_node(address: str, backend: str, environ=os.environ) -> Choice | None:
    """On the rendezvous node, when MASTER_ADDR resolves to loopback here (its /etc/hosts maps its own name to
    127.0.1.1) but to `address` on the other hosts: they will connect to `address`, so gloo / NCCL must listen on
    the interface that holds it -- set as choose_interface sets them (the user's variables win; None when nothing
    is set). NetworkUnusable (exit 69) when no interface here holds `address`, or when the choice is switched off
    and gloo would listen on loopback."""
    host, master = socket.gethostname(), environ.get("MASTER_ADDR", "")
    mine = {var for var in IFNAME_VARS if environ.get(var)}
    unset = tuple(var for var in IFNAME_VARS if var not in mine)
    if not unset:
        return None
    seen = f"MASTER_ADDR={master} is loopback on {host} (its /etc/hosts) but {address} on the other nodes"
    if not picking(environ):
        if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in mine:
            raise NetworkUnusable(f"network: {seen}: gloo would listen on loopback here; unset {NO_PICK_VAR}, map "
                                  f"{master} to {address} in {host}'s /etc/hosts, or {_FIX}")
        return None
    interface = interface_of(address)
    if interface is None:
        raise NetworkUnusable(f"network: {seen}, and no interface of {host} holds {address}: MASTER_ADDR must name "
                              f"the rendezvous node by a name or address every node resolves alike; {_FIX}")
    for var in unset:
        environ[var] = interface
    settings = tuple((var, environ[var]) for var in IFNAME_VARS if environ.get(var))
    return Choice(Route(master, address, address, interface), unset, settings)
