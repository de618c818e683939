"""The `[transparent]` table, the nftables rule text and the original destination, without root.

The rule text is a pure function of the config: the sidecar's marked sockets
and loopback are never captured (or the sidecar would loop into itself), and
applying it twice must leave one table.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import tomllib
import types

import pytest

from meshid.errors import ConfigError
from sidecar import transparent
from sidecar.config import parse_config
from sidecar.transparent import (
    DEFAULT_MARK,
    Transparent,
    nft_remove,
    nft_ruleset,
    parse_original_dst,
)

BASE = """
trust_domain = "example.org"
identity = "web"

[static]
cert = "c.pem"
key = "k.pem"
bundle = "b.pem"
"""


def parse(extra: str) -> Transparent:
    config = parse_config(tomllib.loads(BASE + extra))
    assert config.transparent is not None
    return config.transparent


def test_defaults_and_no_listener_needed() -> None:
    t = parse("[transparent]\napp_ports = [8080]\n")
    assert t == Transparent(app_ports=(8080,))
    assert t.mark == DEFAULT_MARK == 0x6D6964
    assert t.unknown_destination == "deny"


def test_coexists_with_explicit_listeners() -> None:
    config = parse_config(
        tomllib.loads(
            BASE
            + '[[inbound]]\nlisten = "127.0.0.1:9000"\nforward = "127.0.0.1:8000"\n'
            + '[transparent]\nadvertise = ["198.18.0.2:8080", "[2001:db8::1]:8080"]\n'
            + 'unknown_destination = "passthrough"\n'
        )
    )
    assert config.inbound and config.transparent is not None
    assert config.transparent.advertise == (("198.18.0.2", 8080), ("2001:db8::1", 8080))
    assert config.transparent.unknown_destination == "passthrough"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[transparent]\napp_port = [1]\n", "did you mean 'app_ports'"),
        ('[transparent]\nunknown_destination = "allow"\n', "unknown_destination"),
        ("[transparent]\napp_ports = [0]\n", "transparent.app_ports[0]"),
        ("[transparent]\napp_ports = [15001]\n", "sidecar's own port"),
        ('[transparent]\nadvertise = ["api:8080"]\n', "not IP:PORT"),
        ("[transparent]\ninbound_port = 15001\n", "must differ"),
    ],
)
def test_bad_values_are_one_line_errors(extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(tomllib.loads(BASE + extra))


def test_rules_skip_marked_and_loopback_before_capturing() -> None:
    text = nft_ruleset(Transparent(app_ports=(8080, 9090), mark=0x42))
    output = text.split("chain output")[1].split("}")[0]
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    capture = lines.index("meta l4proto tcp redirect to :15001")
    assert lines.index("meta mark 0x42 return") < capture
    assert lines.index('oifname "lo" return') < capture
    assert "fib daddr type local tcp dport { 8080, 9090 } redirect to :15006" in text
    # one transaction that deletes any earlier table first: idempotent
    assert text.startswith("table inet meshid\ndelete table inet meshid\n")
    assert text.count("table inet meshid {") == 1


def test_no_app_ports_no_inbound_capture() -> None:
    assert "prerouting" not in nft_ruleset(Transparent())


def test_remove_succeeds_without_a_table() -> None:
    assert nft_remove() == "table inet meshid\ndelete table inet meshid\n"


def test_original_destination_ipv4_and_ipv6() -> None:
    v4 = struct.pack("!HH4s8x", socket.AF_INET, 8080, socket.inet_aton("198.18.0.2"))
    assert parse_original_dst(socket.AF_INET, v4) == ("198.18.0.2", 8080)
    v6 = struct.pack(
        "!HHI16sI", socket.AF_INET6, 443, 0, socket.inet_pton(socket.AF_INET6, "2001:db8::7"), 0
    )
    assert parse_original_dst(socket.AF_INET6, v6) == ("2001:db8::7", 443)
    with pytest.raises(ValueError):
        parse_original_dst(socket.AF_INET6, v4[:8])


def test_original_destination_is_parsed_once_per_destination_not_per_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every captured connection asks; the answer is one of the mesh's few destinations."""
    made: list[bytes] = []

    def counted(kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> object:
        def make(packed: bytes) -> object:
            made.append(packed)
            return kind(packed)

        return make

    monkeypatch.setattr(
        transparent,
        "ipaddress",
        types.SimpleNamespace(
            IPv4Address=counted(ipaddress.IPv4Address), IPv6Address=counted(ipaddress.IPv6Address)
        ),
    )
    v4 = struct.pack("!HH4s8x", socket.AF_INET, 8081, socket.inet_aton("198.18.7.1"))
    six = socket.inet_pton(socket.AF_INET6, "2001:db8::71")
    for conn in range(50):
        assert parse_original_dst(socket.AF_INET, v4) == ("198.18.7.1", 8081)
        # The flow label differs from one connection to the next; the destination does not.
        v6 = struct.pack("!HHI16sI", socket.AF_INET6, 8081, conn, six, 0)
        assert parse_original_dst(socket.AF_INET6, v6) == ("2001:db8::71", 8081)
    assert len(made) == 2
    # Another port is another destination.
    other = struct.pack("!HH4s8x", socket.AF_INET, 8082, socket.inet_aton("198.18.7.1"))
    assert parse_original_dst(socket.AF_INET, other) == ("198.18.7.1", 8082)
    assert len(made) == 3


class CountingSocket:
    """Just what `original_destination` uses, counting how often the family is asked."""

    def __init__(self, family: int, raw: bytes) -> None:
        self._family = family
        self.raw = raw
        self.asked = 0

    @property
    def family(self) -> int:
        self.asked += 1  # on a real socket, each ask builds an AddressFamily enum
        return self._family

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        return self.raw[:size]


def test_original_destination_asks_the_socket_its_family_once() -> None:
    v4 = struct.pack("!HH4s8x", socket.AF_INET, 8083, socket.inet_aton("198.18.7.2"))
    sock = CountingSocket(socket.AF_INET, v4)
    assert transparent.original_destination(sock) == ("198.18.7.2", 8083)  # type: ignore[arg-type]
    assert sock.asked == 1
