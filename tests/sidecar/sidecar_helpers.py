"""Plain helpers for the sidecar's end-to-end tests (fixtures live in conftest.py).

Everything here runs over real sockets on 127.0.0.1 with certificates from our
own authority. Waiting is always "wait until a condition holds": the decision
log wakes waiters when a line is written, and callers bound every wait with
`trio.fail_after`.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client.parser import text_string_to_metric_families

from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import PrivateKey, build_root, certs_to_pem, generate_key, key_to_pem
from sidecar.app import Sidecar

TD = TrustDomain("example.org")
MESHID = Path(sys.executable).with_name("meshid")  # the installed console script
Addr = tuple[str, int]


def fmt(addr: Addr) -> str:
    """HOST:PORT as the config and the log write it ([::1]:PORT for IPv6)."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def sid(name: str) -> str:
    return str(SpiffeId.resolve(name, TD))


WEB = sid("web")
API = sid("api")


def utcnow() -> datetime:
    return datetime.now(UTC)


# -- certificates --------------------------------------------------------------


@dataclass(frozen=True)
class Creds:
    """A certificate chain (leaf first) and its key."""

    chain: tuple[x509.Certificate, ...]
    key: PrivateKey

    @property
    def serial(self) -> str:
        return f"{self.chain[0].serial_number:x}"

    def cert_pem(self) -> bytes:
        return certs_to_pem(self.chain)

    def key_pem(self) -> bytes:
        return key_to_pem(self.key)

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert.write_bytes(self.cert_pem())
        key.write_bytes(self.key_pem())
        return cert, key


def _ku(*, sign: bool, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def forge(
    *,
    uris: Sequence[str],
    issuer: x509.Certificate,
    issuer_key: PrivateKey,
    not_before: datetime,
    not_after: datetime,
    ca: bool = False,
    sign: bool = True,
) -> Creds:
    """A certificate with exactly the defects the caller asks for, signed by `issuer`."""
    key = generate_key()
    public = key.public_key()
    issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "forged")]))
        .issuer_name(issuer.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(_ku(sign=sign, ca=ca), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )
    return Creds((cert,), key)


@dataclass(frozen=True)
class ForeignCa:
    """A certificate authority that is not ours (same or another trust domain)."""

    trust_domain: TrustDomain
    root: x509.Certificate
    key: PrivateKey

    @classmethod
    def create(cls, trust_domain: TrustDomain) -> ForeignCa:
        key = generate_key()
        now = utcnow()
        root = build_root(
            trust_domain, key, not_before=now - timedelta(days=1), not_after=now + timedelta(days=1)
        )
        return cls(trust_domain, root, key)

    def issue(self, path: str) -> Creds:
        now = utcnow()
        return forge(
            uris=[f"spiffe://{self.trust_domain}/{path}"],
            issuer=self.root,
            issuer_key=self.key,
            not_before=now - timedelta(minutes=1),
            not_after=now + timedelta(hours=1),
        )


# -- the decision log ----------------------------------------------------------


class LogCapture(io.StringIO):
    """A stream for `EventLog` that keeps parsed records and wakes waiters on every line."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []
        self._partial = ""
        self._changed = trio.Event()

    def write(self, s: str) -> int:
        n = super().write(s)
        text = self._partial + s
        *lines, self._partial = text.split("\n")
        for line in lines:
            if line:
                self.records.append(json.loads(line))
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        return n

    def find(self, event: str | None = None, **match: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records
            if (event is None or r.get("event") == event)
            and all(r.get(k) == v for k, v in match.items())
        ]

    async def wait_for(
        self, event: str | None = None, *, count: int = 1, **match: Any
    ) -> list[dict[str, Any]]:
        """Wait until at least `count` records match; return all that do.

        Callers bound this with `trio.fail_after`; every line written wakes it once.
        """
        for _ in range(1_000_000):
            found = self.find(event, **match)
            if len(found) >= count:
                return found
            await self._changed.wait()
        raise AssertionError(f"never saw {count} x {event} {match}")


def metric(sidecar: Sidecar, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0.0 if none)."""
    text = sidecar.metrics.exposition().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += float(sample.value)
    return total


# -- plain endpoints -----------------------------------------------------------


Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def echo(stream: trio.SocketStream) -> None:
    """Echo every byte; on EOF from the client, send EOF back."""
    for _ in range(1_000_000):
        data = await stream.receive_some(65536)
        if not data:
            break
        await stream.send_all(data)
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_eof()


@dataclass
class Backend:
    """A local app on 127.0.0.1: counts accepted connections, runs `handler` on each."""

    handler: Handler = echo
    accepted: int = 0
    errors: list[BaseException] = field(default_factory=list)
    addr: Addr = ("127.0.0.1", 0)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            await self.handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.errors.append(exc)
        finally:
            await stream.aclose()

    async def serve(
        self,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.addr = listeners[0].socket.getsockname()[:2]
        await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    async def serve_on(
        self,
        sock: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start listening on a socket that was bound (and refusing connections) until now."""
        sock.listen()
        self.addr = sock.getsockname()[:2]
        listeners = [trio.SocketListener(sock)]
        await trio.serve_listeners(self._handle, listeners, task_status=task_status)


async def closed_port() -> trio.socket.SocketType:
    """A socket bound on 127.0.0.1 but not listening: connections to it are refused.

    Holding it (rather than closing it) keeps the port ours for the whole test.
    """
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    return sock


async def connect(addr: Addr) -> trio.SocketStream:
    return await trio.open_tcp_stream(addr[0], addr[1])


async def receive_all(stream: trio.abc.ReceiveStream, limit: int = 256 << 20) -> bytes:
    """Everything until EOF (a reset counts as EOF for callers that only want the bytes)."""
    out = bytearray()
    while len(out) <= limit:
        data = await stream.receive_some(65536)
        if not data:
            return bytes(out)
        out += data
    raise AssertionError("more data than expected")


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = await stream.receive_some(n - len(out))
        if not data:
            raise AssertionError(f"EOF after {len(out)} of {n} bytes")
        out += data
    return bytes(out)


async def roundtrip(addr: Addr, payload: bytes) -> bytes:
    """Send `payload`, half-close, and read the reply until EOF."""
    stream = await connect(addr)
    async with stream:
        await stream.send_all(payload)
        await stream.send_eof()
        return await receive_all(stream)


async def refused_roundtrip(addr: Addr) -> bytes:
    """`roundtrip` through a proxy expected to refuse: what came back (nothing, if refused)."""
    with contextlib.suppress(trio.BrokenResourceError):
        return await roundtrip(addr, b"hello")
    return b""


async def wait_cut(stream: trio.abc.ReceiveStream) -> bytes:
    """Read until the connection ends, by EOF or by reset; return what arrived."""
    out = bytearray()
    for _ in range(10_000):
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return bytes(out)
        if not data:
            return bytes(out)
        out += data
    raise AssertionError("connection never ended")


# -- TLS endpoints built with the stdlib, for clients and upstreams we do not trust --


def client_context(tmp: Path, bundle_pem: bytes, creds: Creds | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # an SVID names a SPIFFE ID, not a host
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    if creds is not None:
        cert, key = creds.write(tmp, f"client-{creds.serial}")
        ctx.load_cert_chain(cert, key)
    return ctx


def server_context(tmp: Path, creds: Creds) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert, key = creds.write(tmp, f"server-{creds.serial}")
    ctx.load_cert_chain(cert, key)
    return ctx


async def tls_connect(addr: Addr, ctx: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    tcp = await connect(addr)
    return trio.SSLStream(tcp, ctx, server_hostname=None)


async def expect_refused(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """The TLS server must refuse us: no application byte ever comes back.

    In TLS 1.3 a client's handshake completes before the server has judged the
    client's certificate, so the refusal shows on the first read.
    """
    try:
        await stream.do_handshake()
        await stream.send_all(b"let me in")
        data = await wait_cut(stream)
    except trio.BrokenResourceError:
        return
    finally:
        await trio.aclose_forcefully(stream)
    assert data == b"", f"refused peer received {data!r}"


@dataclass
class TlsUpstream:
    """A TLS server with whatever certificate we give it (an impostor upstream)."""

    ctx: ssl.SSLContext
    accepted: int = 0
    completed: int = 0
    addr: Addr = ("127.0.0.1", 0)

    async def serve(
        self,
        *,
        task_status: trio.TaskStatus[
            list[trio.SSLListener[trio.SocketStream]]
        ] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
            self.accepted += 1
            try:
                await stream.do_handshake()
                self.completed += 1
                await stream.send_all(b"upstream says hi")
                # close_notify both ways: the proxied stream ends cleanly
                transport, _ = await stream.unwrap()
                await transport.aclose()
            except trio.BrokenResourceError:
                pass
            finally:
                await trio.aclose_forcefully(stream)

        listeners = await trio.open_ssl_over_tcp_listeners(0, self.ctx, host="127.0.0.1")
        transport = listeners[0].transport_listener
        assert isinstance(transport, trio.SocketListener)
        self.addr = transport.socket.getsockname()[:2]
        await trio.serve_listeners(handle, listeners, task_status=task_status)


def policy_toml(pairs: Iterable[tuple[str, str]]) -> str:
    return "".join(f'[[allow]]\nfrom = "{a}"\nto = "{b}"\n\n' for a, b in pairs)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def read_events(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines another process has written to its log file so far."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


async def wait_event(path: Path, event: str) -> dict[str, Any]:
    """Poll another process's log file until `event` appears (bounded by the caller's deadline)."""
    while True:
        found = [e for e in read_events(path) if e["event"] == event]
        if found:
            return found[0]
        await trio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_cli(config: Path, stderr_path: Path) -> AsyncIterator[trio.Process]:
    """`meshid sidecar run --config CONFIG` as our own child, killed by its handle on exit."""
    with stderr_path.open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            [str(MESHID), "sidecar", "run", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.move_on_after(10):
                    await proc.wait()
