"""IP:PORT as the address map keys it: pure parsing both sides share.

The authority's `meshid service` commands and the sidecar's `[transparent]
advertise` list read the same text the same way; the IP is kept in its
canonical form because `SO_ORIGINAL_DST` reports it so.
"""

from __future__ import annotations

import ipaddress

from meshid.errors import InvalidInput


def parse_ip_port(text: str) -> tuple[str, int]:
    """IP:PORT ([v6]:PORT), the IP in its canonical form (the map is keyed by it)."""
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidInput(f"{text[:80]!r} is not IP:PORT (IPv6 as [::1]:PORT)") from None
    if not sep or not port_text.isascii() or not port_text.isdigit():
        raise InvalidInput(f"{text[:80]!r} is not IP:PORT (IPv6 as [::1]:PORT)")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidInput(f"{port_text[:10]!r} is not a port number")
    return str(ip), port
