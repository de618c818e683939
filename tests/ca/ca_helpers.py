"""Plain helpers shared by the authority's tests (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import psycopg
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from ca import backend
from ca.audit import GENESIS_HASH, _row_hash
from ca.store import DB_NAME
from meshid.cli import cli
from meshid.clock import ManualClock
from meshid.spiffeid import TrustDomain
from meshid.svid import PrivateKey, generate_key

TD = TrustDomain("example.org")
MESHID = Path(sys.executable).with_name("meshid")  # the installed console script


class Clock(ManualClock):
    """Wall time that moves only when the test says so, callable as ca.api's clock.

    Its monotonic time runs on as well (a server under test waits on real
    sockets; its caches and throttles must see time pass) and `advance` moves
    it too. A test that needs time frozen uses a plain ManualClock.
    """

    def __call__(self) -> datetime:
        return self.now

    def _monotonic(self) -> float:
        return time.monotonic() + self.elapsed


def make_csr(
    key: PrivateKey | None = None,
    *,
    sans: Sequence[x509.GeneralName] = (),
    ca: bool = False,
) -> tuple[PrivateKey, bytes]:
    """A DER CSR; `sans` and `ca` are what a hostile requester might ask for."""
    key = key or generate_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "requested-by-workload")])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    csr = builder.sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.DER)


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    """`meshid ARGS` in-process."""
    return CliRunner().invoke(cli, list(args), prog_name="meshid", env=env)


def snapshot(state: Path) -> dict[str, str]:
    """What the authority holds: file hashes, and the database's logical content.

    The database is compared by its SQL dump, not its bytes: merely opening it
    in WAL mode may create and remove side files without changing anything.
    """
    out: dict[str, str] = {}
    for path in sorted(state.rglob("*")):
        if path.is_file() and not path.name.startswith(DB_NAME) and not path.name.endswith(".lock"):
            out[str(path.relative_to(state))] = hashlib.sha256(path.read_bytes()).hexdigest()
    db = state / DB_NAME
    if db.exists():
        conn = sqlite3.connect(db)
        try:
            dump = "\n".join(conn.iterdump())
        finally:
            conn.close()
        out[DB_NAME] = hashlib.sha256(dump.encode()).hexdigest()
    return out


def raw_files(state: Path) -> dict[str, tuple[str, int]]:
    """Every file's hash and mtime, byte for byte."""
    return {
        str(p.relative_to(state)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(state.rglob("*"))
        if p.is_file()
    }


def query(state: Path, sql: str) -> list[tuple[object, ...]]:
    """Rows straight from the state directory's database, whichever engine holds it."""
    database = backend.load(state)
    if database is not None:
        with psycopg.connect(database.url, password=database.password()) as pg:
            return [tuple(row) for row in pg.execute(sql).fetchall()]
    conn = sqlite3.connect(state / DB_NAME)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def rechain(state: Path, edit: str | None = None, upto: int | None = None) -> None:
    """Edit the database as an attacker would: change rows, then recompute every later link
    with the unkeyed hash (all one can do without the key file)."""
    conn = sqlite3.connect(state / DB_NAME)
    try:
        if edit is not None:
            conn.execute(edit)
        rows = conn.execute("SELECT seq, at, action, details FROM audit ORDER BY seq").fetchall()
        prev = GENESIS_HASH
        for seq, at, action, details in rows:
            if upto is not None and seq > upto:
                break
            digest = _row_hash(prev, seq, at, action, details)
            conn.execute(
                "UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, digest, seq)
            )
            prev = digest
        conn.commit()
    finally:
        conn.close()


def tls_exchange(port: int, bundle: Path, data: bytes) -> bytes:
    """Send `data` to 127.0.0.1:`port` over TLS (trusting `bundle`); all that comes back."""
    ctx = ssl.create_default_context(cafile=str(bundle))
    ctx.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.sendall(data)
        out = b""
        while chunk := tls.recv(65536):
            out += chunk
    return out


def events_in(log: Path, event: str) -> list[dict[str, object]]:
    """The JSON lines of `log` whose event is `event`, in order."""
    out = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            out.append(record)
    return out


def wait_event(
    log: Path, event: str, proc: subprocess.Popen[bytes], timeout: float, **match: object
) -> dict[str, object]:
    """The first `event` line of `log` whose fields include `match`, within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in events_in(log, event):
            if all(record.get(k) == v for k, v in match.items()):
                return record
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{event} {match} not logged in time:\n{log.read_text()}")


def wait_lines(log: Path, needle: str, count: int, proc: subprocess.Popen[bytes]) -> list[str]:
    """The log's lines holding `needle`, once there are `count` (30 s at most)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = [line for line in log.read_text().splitlines() if needle in line]
        if len(lines) >= count:
            return lines
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{count} x {needle!r} not logged in time:\n{log.read_text()}")


@contextmanager
def serving_process(state: Path, log: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """`meshid ca serve --listen 127.0.0.1:0 EXTRA` logging to `log`; stopped at the end."""
    argv = [str(MESHID), "ca", "serve", "--state", str(state), "--listen", "127.0.0.1:0", *extra]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
