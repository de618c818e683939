"""Fetching a federated trust domain's bundle from its SPIFFE bundle endpoint (`https_spiffe`).

Per the SPIFFE Federation specification: an HTTPS GET of the endpoint URL;
the server's certificate must chain to the bundle we already hold for that
trust domain (the bootstrap bundle, then each one fetched since) and name
exactly the configured endpoint ID; host names are not checked, the SPIFFE
ID is. The body is parsed as that trust domain's SPIFFE bundle. Whether the
result is taken (its sequence must not go backwards) is
`meshid.federation.take_fetched`'s rule; this module only does the I/O.
"""

from __future__ import annotations

import ipaddress
import ssl
from urllib.parse import urlsplit

import h11
import trio
from cryptography import x509

from meshid.bundle import TrustBundle
from meshid.errors import InvalidInput, InvalidSvid, MeshIdError
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId
from meshid.svid import leaf_spiffe_id
from meshid.version import SERVER_HEADER

MAX_BODY = 1 << 20  # a bundle of a few dozen roots is tens of kilobytes


def parse_endpoint_url(url: str) -> tuple[str, int, str]:
    """(host, port, path) of an https URL, or InvalidInput."""
    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError as exc:
        raise InvalidInput(f"--url {url!r}: {exc}") from None
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidInput(f"--url {url!r}: expected https://HOST[:PORT][/PATH]")
    return parts.hostname, port, parts.path or "/"


def _client_context(held: TrustBundle) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # https_spiffe: the SPIFFE ID is checked, not the host name
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=held.to_pem().decode())
    return ctx


FETCH_TIMEOUT = 10.0  # seconds for connect, handshake and the whole answer


async def fetch_bundle(url: str, endpoint_id: SpiffeId, held: TrustBundle) -> TrustBundle:
    """The bundle the endpoint serves now, authenticated with `held`; MeshIdError if not."""
    host, port, path = parse_endpoint_url(url)
    timeout = FETCH_TIMEOUT
    try:
        with trio.fail_after(timeout):
            return await _fetch(host, port, path, endpoint_id, held)
    except trio.TooSlowError:
        raise MeshIdError(
            f"{url}: no answer within {timeout:g}s", reason=Reason.BUNDLE_ENDPOINT_UNREACHABLE
        ) from None
    except (OSError, trio.BrokenResourceError, ssl.SSLError, h11.ProtocolError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise InvalidSvid(
                f"{url}: the endpoint's certificate does not chain to the bundle held for "
                f"{held.trust_domain}",
                reason=Reason.UNTRUSTED_CERTIFICATE,
            ) from None
        raise MeshIdError(f"{url}: {detail}", reason=Reason.BUNDLE_ENDPOINT_UNREACHABLE) from None


async def _fetch(
    host: str, port: int, path: str, endpoint_id: SpiffeId, held: TrustBundle
) -> TrustBundle:
    tcp = await trio.open_tcp_stream(host, port)
    try:
        sni = None
        try:
            ipaddress.ip_address(host)
        except ValueError:
            sni = host
        stream = trio.SSLStream(tcp, _client_context(held), server_hostname=sni)
        await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
        if der is None:  # pragma: no cover - CERT_REQUIRED
            raise InvalidSvid(f"{host}: sent no certificate", reason=Reason.INVALID_SVID)
        presented = leaf_spiffe_id(x509.load_der_x509_certificate(der))
        if presented != endpoint_id:
            raise InvalidSvid(
                f"bundle endpoint authenticated as {presented}, expected {endpoint_id}",
                reason=Reason.WRONG_ENDPOINT_ID,
            )
        body = await _get(stream, host, path)
    finally:
        await trio.aclose_forcefully(tcp)
    return TrustBundle.from_spiffe_json(held.trust_domain, body)


async def _get(stream: trio.SSLStream[trio.SocketStream], host: str, path: str) -> bytes:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=16 * 1024)
    request = h11.Request(
        method="GET",
        target=path,
        headers=[("host", host), ("user-agent", SERVER_HEADER), ("accept", "application/json")],
    )
    await stream.send_all((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
    status = 0
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(bytes(data))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise InvalidSvid(f"bundle over {MAX_BODY} bytes", reason=Reason.INVALID_BUNDLE)
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    if status != 200:
        raise MeshIdError(
            f"bundle endpoint answered HTTP {status}", reason=Reason.BUNDLE_ENDPOINT_UNREACHABLE
        )
    return bytes(body)
