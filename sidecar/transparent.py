"""Transparent interception: the `[transparent]` table, the nft rules, the original destination.

An unchanged app connects to its peer's real address; rules in the app's
network namespace send the connection to the sidecar instead, and the sidecar
reads where it was going (`SO_ORIGINAL_DST`). The sidecar's own connections
must never be captured, or it would loop into itself: it marks its sockets
(`SO_MARK`) and the rules skip marked packets, which holds even when the app
and the sidecar run as the same user. Loopback is never captured either.

Everything here is pure but `original_destination`, one getsockopt: the rule
text is built from the config alone and tested without root; applying it is
`nft -f -` in `sidecar/redirect.py`.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import struct
from dataclasses import dataclass

from meshid.errors import ConfigError, InvalidInput
from meshid.netaddr import parse_ip_port
from sidecar.configtable import Table

DEFAULT_MARK = 0x6D6964  # "mid"
TABLE = "meshid"
KEYS = ("outbound_port", "inbound_port", "app_ports", "advertise", "unknown_destination", "mark")
UNKNOWN_DESTINATION = ("deny", "passthrough")
MAX_APP_PORTS = 64

# linux/netfilter_ipv4.h and linux/netfilter_ipv6/ip6_tables.h: both 80
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SO_MARK = getattr(socket, "SO_MARK", 36)


@dataclass(frozen=True, slots=True)
class Transparent:
    outbound_port: int = 15001
    inbound_port: int = 15006
    app_ports: tuple[int, ...] = ()
    advertise: tuple[tuple[str, int], ...] = ()
    unknown_destination: str = "deny"
    mark: int = DEFAULT_MARK


def _host_port(text: object, key: str) -> tuple[str, int]:
    """An IP literal and a port: the map is keyed by what `SO_ORIGINAL_DST` returns."""
    if not isinstance(text, str):
        raise ConfigError(f'{key}: expected "IP:PORT"')
    try:
        return parse_ip_port(text)
    except InvalidInput as exc:
        raise ConfigError(f"{key}: {exc.message}") from None


def parse_transparent(table: Table) -> Transparent:
    outbound_port = table.integer("outbound_port", 15001, maximum=65535)
    inbound_port = table.integer("inbound_port", 15006, maximum=65535)
    if outbound_port == inbound_port:
        raise ConfigError(f"{table.path('inbound_port')}: must differ from outbound_port")
    raw_ports = table.get("app_ports", [])
    if not isinstance(raw_ports, list) or len(raw_ports) > MAX_APP_PORTS:
        raise ConfigError(f"{table.path('app_ports')}: expected a list of up to 64 ports")
    ports: list[int] = []
    for i, port in enumerate(raw_ports):
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise ConfigError(f"{table.path('app_ports')}[{i}]: expected a port from 1 to 65535")
        if port in (outbound_port, inbound_port):
            raise ConfigError(f"{table.path('app_ports')}[{i}]: is the sidecar's own port")
        if port not in ports:
            ports.append(port)
    raw_advertise = table.get("advertise", [])
    if not isinstance(raw_advertise, list) or len(raw_advertise) > MAX_APP_PORTS:
        raise ConfigError(f"{table.path('advertise')}: expected a list of up to 64 IP:PORT")
    advertise = tuple(
        _host_port(item, f"{table.path('advertise')}[{i}]") for i, item in enumerate(raw_advertise)
    )
    unknown = table.string("unknown_destination", "deny")
    if unknown not in UNKNOWN_DESTINATION:
        raise ConfigError(f'{table.path("unknown_destination")}: expected "deny" or "passthrough"')
    mark = table.integer("mark", DEFAULT_MARK, maximum=0xFFFFFFFF)
    table.done()
    return Transparent(
        outbound_port=outbound_port,
        inbound_port=inbound_port,
        app_ports=tuple(ports),
        advertise=advertise,
        unknown_destination=unknown,
        mark=mark,
    )


def nft_ruleset(t: Transparent) -> str:
    """The whole `meshid` table, for `nft -f -`: idempotent, since it deletes the table first.

    Declaring the table before deleting it makes the delete succeed when there
    is none, and the file is one transaction: applying it twice leaves one table.
    Output: every TCP connection the namespace opens is sent to the outbound
    port, but the sidecar's own (marked) and loopback. Prerouting: connections
    from other hosts to an app port of a local address are sent to the inbound
    port (traffic this host merely routes is left alone).
    """
    lines = [
        f"table inet {TABLE}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        "\tchain output {",
        "\t\ttype nat hook output priority -100; policy accept;",
        f"\t\tmeta mark {t.mark:#x} return",
        '\t\toifname "lo" return',
        "\t\tip daddr 127.0.0.0/8 return",
        "\t\tip6 daddr ::1 return",
        f"\t\tmeta l4proto tcp redirect to :{t.outbound_port}",
        "\t}",
    ]
    if t.app_ports:
        ports = ", ".join(str(p) for p in t.app_ports)
        lines += [
            "\tchain prerouting {",
            "\t\ttype nat hook prerouting priority -100; policy accept;",
            '\t\tiifname "lo" return',
            f"\t\tfib daddr type local tcp dport {{ {ports} }} redirect to :{t.inbound_port}",
            "\t}",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def nft_remove() -> str:
    """Deletes the `meshid` table, and succeeds when there is none."""
    return f"table inet {TABLE}\ndelete table inet {TABLE}\n"


def parse_original_dst(family: int, raw: bytes) -> tuple[str, int]:
    """A `sockaddr_in` / `sockaddr_in6` as returned by `SO_ORIGINAL_DST`, as (ip, port).

    Only the port and the address are read: an IPv6 answer also carries the
    connection's flow label, which differs from one connection to the next.
    """
    if family == socket.AF_INET and len(raw) >= 8:
        return _endpoint(family, raw[2:8])
    if family == socket.AF_INET6 and len(raw) >= 24:
        return _endpoint(family, raw[2:4] + raw[8:24])
    raise ValueError("not a sockaddr of the socket's family")


# Every captured connection asks, and the answers are the mesh's destinations: a few,
# asked again and again. Text in the canonical form the address map is keyed by.
@functools.lru_cache(maxsize=1024)
def _endpoint(family: int, packed: bytes) -> tuple[str, int]:
    port = struct.unpack("!H", packed[:2])[0]
    if family == socket.AF_INET:
        return (str(ipaddress.IPv4Address(packed[2:])), port)
    return (str(ipaddress.IPv6Address(packed[2:])), port)


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where the captured connection was going; OSError when it was not redirected."""
    family = sock.family  # asked once: each ask builds an AddressFamily enum
    if family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
    else:
        raw = sock.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, 16)
    return parse_original_dst(family, raw)


def mark_socket(sock: socket.socket, mark: int) -> None:
    """Mark the sidecar's own socket so that the rules never capture it (needs CAP_NET_ADMIN)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
