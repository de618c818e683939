"""PROXY protocol v2 headers (haproxy.org proxy-protocol.txt, section 2.2).

Sent to the local app before any proxied byte, so the app learns the peer's
address and the SPIFFE ID the sidecar authenticated. The ID travels in a
custom TLV, type 0xE0 (the first of the application-defined range), inside
nothing else; the connection is also marked as TLS with a client
certificate in a PP2_TYPE_SSL TLV carrying the TLS version.
"""

from __future__ import annotations

import ipaddress
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_TYPE_SPIFFE_ID = 0xE0
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def encode_v2(
    src: tuple[str, int], dst: tuple[str, int], spiffe_id: str, tls_version: str = "TLSv1.3"
) -> bytes:
    src_ip = ipaddress.ip_address(src[0])
    dst_ip = ipaddress.ip_address(dst[0])
    if src_ip.version != dst_ip.version:  # mixed families: map v4 into v6
        src_ip = ipaddress.IPv6Address(f"::ffff:{src_ip}") if src_ip.version == 4 else src_ip
        dst_ip = ipaddress.IPv6Address(f"::ffff:{dst_ip}") if dst_ip.version == 4 else dst_ip
    family = 0x11 if src_ip.version == 4 else 0x21  # TCP over IPv4 / IPv6
    addresses = src_ip.packed + dst_ip.packed + struct.pack("!HH", src[1], dst[1])
    ssl_value = struct.pack(
        "!BI", PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS, 0
    ) + _tlv(PP2_SUBTYPE_SSL_VERSION, tls_version.encode())
    tlvs = _tlv(PP2_TYPE_SSL, ssl_value) + _tlv(PP2_TYPE_SPIFFE_ID, spiffe_id.encode())
    body = addresses + tlvs
    return SIGNATURE + struct.pack("!BBH", 0x21, family, len(body)) + body


def decode_v2(data: bytes) -> tuple[tuple[str, int], tuple[str, int], dict[int, bytes], int]:
    """Parse a v2 header at the start of `data`: (src, dst, tlvs, header length).

    For apps and tests that receive the header; raises ValueError on anything malformed.
    """
    if len(data) < 16 or not data.startswith(SIGNATURE):
        raise ValueError("not a PROXY v2 header")
    ver_cmd, family, length = struct.unpack("!BBH", data[12:16])
    if ver_cmd != 0x21:
        raise ValueError("unsupported PROXY version or command")
    end = 16 + length
    if len(data) < end:
        raise ValueError("truncated PROXY header")
    body = data[16:end]
    size = {0x11: 4, 0x21: 16}.get(family)
    if size is None:
        raise ValueError("unsupported address family")
    src = (
        str(ipaddress.ip_address(body[:size])),
        struct.unpack("!H", body[2 * size : 2 * size + 2])[0],
    )
    dst_port = struct.unpack("!H", body[2 * size + 2 : 2 * size + 4])[0]
    dst = (str(ipaddress.ip_address(body[size : 2 * size])), dst_port)
    tlvs: dict[int, bytes] = {}
    pos = 2 * size + 4
    while pos < len(body):
        if pos + 3 > len(body):
            raise ValueError("truncated TLV")
        kind, tlen = struct.unpack("!BH", body[pos : pos + 3])
        if pos + 3 + tlen > len(body):
            raise ValueError("truncated TLV")
        tlvs[kind] = body[pos + 3 : pos + 3 + tlen]
        pos += 3 + tlen
    return src, dst, tlvs, end
