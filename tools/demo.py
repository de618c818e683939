"""`make demo`: the whole system on 127.0.0.1, step by step, in a temporary directory.

Theory of operation:

- Everything runs for real: `meshid ca init` / `ca serve` / `ca token` /
  `policy ...` through the installed console script, and one `meshid sidecar
  run` process per service, each enrolled from its own one-time join token.
  The "api" app is a small HTTP server in this process that reads the PROXY v2
  header its sidecar sends and answers with the caller's SPIFFE ID; "web" and
  "batch" (the intruder) are clients in this process that only ever talk to
  their own sidecar's outbound listener.
- Every listener binds 127.0.0.1 port 0; the real ports are read back from the
  "serving" / "started" log lines. Each long-running process logs JSON lines to
  a file that is tailed; every wait polls a condition against a deadline (and
  fails early if the process it waits on has died). Nothing sleeps to
  synchronise.
- Each step prints what it did and ✓ or ✗. The first ✗ stops the demo; exit
  status 0 only when every step did what it showed. Whatever happens (a failed
  step, Ctrl-C, SIGTERM), every process started here is stopped by its pid and
  the temporary directory is removed (unless --keep).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from sidecar.proxyproto import PP2_TYPE_SPIFFE_ID, decode_v2

MESHID = Path(sys.executable).with_name("meshid")  # the console script of this venv
TRUST_DOMAIN = "example.org"
SVID_TTL = "30s"
LOCALHOST = "127.0.0.1"
POLL = 0.05  # seconds between two looks at a condition
RENEWAL_DEADLINE = 30.0  # a 30 s SVID is renewed after 13.5-16.5 s
T = TypeVar("T")


class StepFailed(Exception):
    """A step did not do what it was meant to show; the message says what happened instead."""


def sid(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/{name}"


# -- output --------------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.steps = 0

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.started:5.1f}s"

    def step(self, title: str) -> None:
        self.steps += 1
        print(f"\n[{self.elapsed()}] {self.steps}. {title}")

    def cmd(self, args: Sequence[str]) -> None:
        print(f"    $ meshid {' '.join(args)}")

    def ok(self, text: str) -> None:
        print(f"    ✓ {text}")

    def info(self, text: str) -> None:
        print(f"      {text}")

    def line(self, label: str, record: dict[str, Any]) -> None:
        print(f"      {label}:")
        print(f"        {json.dumps(record, separators=(',', ':'))}")

    def fail(self, text: str) -> None:
        print(f"    ✗ {text}")


# -- processes and their logs --------------------------------------------------


class EventFile:
    """Tails a file of JSON lines; anything else (a one-line CLI error) is kept as text."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.text: list[str] = []
        self._offset = 0
        self._partial = b""

    def refresh(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for raw in lines:
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            if isinstance(record, dict):
                self.records.append(record)
            elif raw.strip():
                self.text.append(raw.decode(errors="replace"))

    def find(self, event: str, **match: Any) -> list[dict[str, Any]]:
        self.refresh()
        return [
            r
            for r in self.records
            if r.get("event") == event and all(r.get(k) == v for k, v in match.items())
        ]

    def first(self, event: str, **match: Any) -> dict[str, Any] | None:
        found = self.find(event, **match)
        return found[0] if found else None


class Proc:
    """A long-running process of the demo, its stderr going to a log file."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: EventFile) -> None:
        self.name = name
        self.popen = popen
        self.log = log
        self.listeners: dict[str, str] = {}  # from its "started" line

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        rc = self.popen.poll()
        if rc is not None:
            self.log.refresh()
            last = (self.log.text or [json.dumps(r) for r in self.log.records] or ["(no output)"])[
                -1
            ]
            raise StepFailed(f"{self.name} (pid {self.pid}) exited with status {rc}: {last}")

    def stop(self, timeout: float = 10.0) -> str:
        """SIGTERM (the sidecar drains, the control plane stops), then SIGKILL after `timeout`."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
                return f"{self.name} (pid {self.pid}) killed after {timeout:g}s"
        return f"{self.name} (pid {self.pid}) stopped, status {self.popen.returncode}"


def wait_for(
    what: str, condition: Callable[[], T | None], timeout: float, watch: Sequence[Proc] = ()
) -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        for proc in watch:
            proc.check_alive()
        if time.monotonic() >= deadline:
            raise StepFailed(f"no {what} within {timeout:g}s")
        time.sleep(POLL)


# -- the api app: HTTP behind a PROXY v2 header ----------------------------------


def read_proxy_header(sock: socket.socket) -> tuple[str, tuple[str, int], bytes]:
    """(caller's SPIFFE ID, caller's address, bytes already read past the header)."""
    data = b""
    while len(data) < 16 or len(data) < 16 + int.from_bytes(data[14:16], "big"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed before the PROXY header was complete")
        data += chunk
    src, _dst, tlvs, end = decode_v2(data)
    return tlvs.get(PP2_TYPE_SPIFFE_ID, b"").decode(), src, data[end:]


class ApiHandler(socketserver.BaseRequestHandler):
    """One connection from api's sidecar: a PROXY v2 header, then keep-alive HTTP/1.1."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(60)
        try:
            caller, src, buf = read_proxy_header(sock)
            served = 0
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = sock.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                path = head.split(b" ")[1].decode(errors="replace") if b" " in head else "?"
                served += 1
                body = (
                    f"hello {caller or '(no identity)'} -- api here: GET {path}, "
                    f"request {served} on this connection from {src[0]}:{src[1]}\n"
                ).encode()
                reply = (
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    f"X-Caller-Spiffe-Id: {caller}\r\nContent-Length: {len(body)}\r\n\r\n"
                )
                sock.sendall(reply.encode() + body)
        except (OSError, ValueError):
            return  # the connection was cut or malformed: that connection only


class ApiServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


# -- the clients: web and batch talk to their own sidecar only --------------------


def http_get(sock: socket.socket, path: str) -> tuple[int, dict[str, str], str]:
    """One keep-alive request on `sock`; (status, headers, body)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: api\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed without a response")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    headers = dict(
        (k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])
    )
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed in the middle of the body")
        body += chunk
    return int(lines[0].split(" ")[1]), headers, body.decode(errors="replace")


def connect(addr: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(addr, timeout=timeout)


def is_cut(sock: socket.socket, timeout: float) -> str | None:
    """How the connection ended, if it ends (EOF or reset) within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(1)
    except (ConnectionResetError, BrokenPipeError) as exc:
        return type(exc).__name__
    except TimeoutError:
        return None
    return "end of stream" if not data else None


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


# -- the demo --------------------------------------------------------------------


class Demo:
    def __init__(self, root: Path, report: Report) -> None:
        self.root = root
        self.report = report
        self.procs: list[Proc] = []
        self.sockets: list[socket.socket] = []
        self.api_app: ApiServer | None = None
        self.server = ""

    # -- plumbing --

    def meshid(self, *args: str, expect: int = 0, show: bool = True) -> str:
        if show:
            self.report.cmd(args)
        done = subprocess.run(  # noqa: S603 -- our own console script, our own arguments
            [str(MESHID), *args], capture_output=True, text=True, timeout=60, cwd=self.root
        )
        if done.returncode != expect:
            raise StepFailed(
                f"meshid {' '.join(args)} exited {done.returncode}, expected {expect}: "
                f"{(done.stderr or done.stdout).strip()}"
            )
        return done.stdout.strip()

    def spawn(self, name: str, *args: str) -> Proc:
        log_path = self.root / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(  # noqa: S603 -- our own console script
                [str(MESHID), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.root,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops them in order
            )
        proc = Proc(name, popen, EventFile(log_path))
        self.procs.append(proc)
        return proc

    def cleanup(self) -> list[str]:
        for sock in self.sockets:
            with suppress(OSError):
                sock.close()
        stopped = [proc.stop() for proc in reversed(self.procs)]
        if self.api_app is not None:
            self.api_app.shutdown()
            self.api_app.server_close()
        return stopped

    def sidecar(
        self, name: str, *, inbound: str | None = None, outbound: Sequence[tuple[str, str]] = ()
    ) -> Proc:
        """Write a join token and a config for `name`; start its sidecar and wait for it."""
        token = self.meshid("ca", "token", "--state", "ca", name, show=False)
        (self.root / f"{name}.token").write_text(token + "\n")
        lines = [
            f'identity = "{name}"',
            f'trust_domain = "{TRUST_DOMAIN}"',
            "",
            "[authority]",
            f'server = "{self.server}"',
            'bundle = "bundle.pem"',
            f'token_file = "{name}.token"',
            f'state_dir = "{name}-state"',
            "",
            "[admin]",
            f'listen = "{LOCALHOST}:0"',
            "",
            "[limits]",
            'drain_timeout = "3s"',
        ]
        if inbound is not None:
            lines += [
                "",
                "[inbound]",
                f'listen = "{LOCALHOST}:0"',
                f'forward = "{inbound}"',
                "proxy_protocol = true",
            ]
        for identity, upstream in outbound:
            lines += [
                "",
                "[[outbound]]",
                f'listen = "{LOCALHOST}:0"',
                f'upstream = "{upstream}"',
                f'identity = "{identity}"',
            ]
        config = self.root / f"{name}.toml"
        config.write_text("\n".join(lines) + "\n")
        proc = self.spawn(name, "sidecar", "run", "--config", config.name)
        started = wait_for(
            f"'started' line from {name}'s sidecar",
            lambda: proc.log.first("started"),
            20,
            [proc],
        )
        creds = proc.log.first("credentials", how="enrolled")
        if creds is None:
            raise StepFailed(f"{name}'s sidecar started without enrolling: {started}")
        proc.listeners = dict(started["listeners"])
        listeners = ", ".join(f"{k} {v}" for k, v in proc.listeners.items())
        self.report.ok(
            f"{name:<6} enrolled as {creds['spiffe_id']}, serial {creds['serial'][:12]}…, "
            f"sidecar pid {proc.pid} ({listeners})"
        )
        return proc

    # -- the steps --

    def run(self) -> None:
        r = self.report

        r.step(f"The authority: a root CA, SVIDs that live {SVID_TTL}, a TLS control plane")
        out = self.meshid(
            "ca", "init", "--state", "ca", "--trust-domain", TRUST_DOMAIN, "--svid-ttl", SVID_TTL
        )
        r.ok(out.splitlines()[0] if out else f"authority for {TRUST_DOMAIN} created in ca/")
        (self.root / "bundle.pem").write_text(
            self.meshid("ca", "bundle", "--state", "ca", show=False) + "\n"
        )
        serve_args = ["ca", "serve", "--state", "ca", "--listen", f"{LOCALHOST}:0"]
        serve_args += ["--ip", LOCALHOST]
        r.cmd(serve_args)
        ca = self.spawn("ca", *serve_args)
        serving = wait_for("'serving' line", lambda: ca.log.first("serving"), 20, [ca])
        self.server = serving["listen"]
        r.ok(f"control plane serving on {self.server} (pid {ca.pid})")

        r.step("Three services, each with a sidecar enrolled from a one-time join token")
        r.info("$ meshid ca token --state ca NAME > NAME.token   (for api, web and batch)")
        self.api_app = ApiServer((LOCALHOST, 0), ApiHandler)
        threading.Thread(target=self.api_app.serve_forever, daemon=True).start()
        app_addr = f"{LOCALHOST}:{self.api_app.server_address[1]}"
        r.info(f"api app (HTTP, expects a PROXY v2 header) listening on {app_addr}")
        api = self.sidecar("api", inbound=app_addr)
        api_inbound = api.listeners["inbound[0]"]
        web = self.sidecar("web", outbound=[("api", api_inbound)])
        batch = self.sidecar("batch", outbound=[("api", api_inbound)])
        sidecars = [api, web, batch]
        web_out = parse_addr(web.listeners["outbound[0]"])
        batch_out = parse_addr(batch.listeners["outbound[0]"])

        r.step("web -> api is allowed, and api sees who is calling")
        r.info(self.meshid("policy", "allow", "web", "api", "--state", "ca"))
        for proc in (api, web):
            policy = wait_for(
                f"the new allow-list at {proc.name}'s sidecar",
                functools.partial(proc.log.first, "policy", pairs=1),
                10,
                sidecars,
            )
            r.ok(f"{proc.name}'s sidecar has policy version {policy['version']} from the feed")
        web_sock = connect(web_out)
        self.sockets.append(web_sock)
        status, headers, body = http_get(web_sock, "/hello")
        if status != 200 or headers.get("x-caller-spiffe-id") != sid("web"):
            raise StepFailed(f"web -> api answered {status} {headers} {body!r}")
        r.ok(f"web's app -> web's sidecar {web_out[0]}:{web_out[1]} -> mTLS -> api: HTTP {status}")
        r.ok(f"api answered: {body.strip()}")
        allowed = wait_for(
            "allow decision at api's sidecar",
            lambda: api.log.first("decision", decision="allow", peer_id=sid("web")),
            5,
            sidecars,
        )
        r.line("api's sidecar logged", allowed)
        r.info("(this connection stays open: it is used again after the renewal)")

        r.step("batch -> api is not on the allow-list: refused, with the reason in the log")
        check = self.meshid("policy", "check", "batch", "api", "--state", "ca", expect=1)
        r.ok(f"the authority says: {check}")
        with connect(batch_out) as sock:
            try:
                http_get(sock, "/steal")
            except OSError as exc:
                r.ok(f"batch's app -> batch's sidecar -> api: refused ({exc})")
            else:
                raise StepFailed("batch's request to api got an answer")
        refused = wait_for(
            "deny decision at batch's sidecar",
            lambda: batch.log.first("decision", decision="deny", peer_id=sid("api")),
            5,
            sidecars,
        )
        r.line("batch's own sidecar refused to reach api (default deny)", refused)
        r.info("batch now skips its sidecar and shows its own SVID straight to api's sidecar:")
        self.direct_tls(parse_addr(api_inbound), self.root / "batch-state")
        refused = wait_for(
            "deny decision at api's sidecar",
            lambda: api.log.first("decision", decision="deny", peer_id=sid("batch")),
            10,
            sidecars,
        )
        r.ok(f"api's sidecar refused {refused['peer_id']}: {refused['reason']}")
        r.line("api's sidecar logged", refused)

        r.step(f"Certificates renew at half their lifetime ({SVID_TTL} SVIDs)")
        enrolled = web.log.first("credentials", how="enrolled")
        assert enrolled is not None
        r.info(f"waiting for web's sidecar to renew serial {enrolled['serial']}…")
        renewed = wait_for(
            "'renewed' line from web's sidecar",
            lambda: web.log.first("credentials", how="renewed"),
            RENEWAL_DEADLINE,
            sidecars,
        )
        r.ok(f"web renewed: serial {enrolled['serial']} -> {renewed['serial']}")
        r.info(f"new certificate valid until {renewed['not_after']}")
        with connect(web_out) as sock:
            status, headers, _ = http_get(sock, "/after-renewal")
        new_peer = wait_for(
            "api's sidecar seeing web's new certificate",
            lambda: api.log.first("decision", decision="allow", peer_serial=renewed["serial"]),
            5,
            sidecars,
        )
        r.ok(
            f"a new connection presents the new certificate: api's sidecar saw serial "
            f"{new_peer['peer_serial']} (HTTP {status})"
        )
        status, headers, body = http_get(web_sock, "/still-there")
        if status != 200:
            raise StepFailed(f"the long-lived connection answered {status} after the renewal")
        r.ok(f"the connection opened before the renewal still works: {body.strip()}")

        r.step("policy deny web api cuts the live connection within a second or so")
        denied_at = time.monotonic()
        r.info(self.meshid("policy", "deny", "web", "api", "--state", "ca"))
        closed = wait_for(
            "'close' line with reason policy_revoked",
            lambda: (
                web.log.first("close", reason="policy_revoked")
                or api.log.first("close", reason="policy_revoked")
            ),
            10,
            sidecars,
        )
        took = time.monotonic() - denied_at
        who = "web" if closed.get("local_id") == sid("web") else "api"
        r.ok(f"{who}'s sidecar closed the live web -> api connection after {took:.1f}s")
        r.line(f"{who}'s sidecar logged", closed)
        how = is_cut(web_sock, 5)
        if how is None:
            raise StepFailed("web's app still has an open connection to api after the deny")
        r.ok(f"web's app saw its connection end ({how})")
        with connect(web_out) as sock:
            try:
                http_get(sock, "/again")
            except OSError:
                pass
            else:
                raise StepFailed("a new web -> api request got through after the deny")
        again = wait_for(
            "deny decision at web's sidecar",
            lambda: web.log.first("decision", decision="deny", reason="not_allowed"),
            5,
            sidecars,
        )
        r.ok(f"a new web -> api connection is refused: {again['reason']} ({again['detail']})")

    def direct_tls(self, addr: tuple[str, int], state: Path) -> None:
        """Connect to `addr` with the SVID in `state` and no sidecar; expect to be refused."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # an SVID names a SPIFFE ID, not a host; the CA is checked
        ctx.load_verify_locations(self.root / "bundle.pem")
        ctx.load_cert_chain(state / "svid.pem", state / "svid.key")
        with connect(addr) as raw:
            try:
                with ctx.wrap_socket(raw) as tls:
                    status, _, _ = http_get(tls, "/steal")
            except OSError as exc:  # ssl.SSLError included: the handshake or the alert after it
                self.report.ok(f"batch's TLS connection was refused by api's sidecar ({exc})")
            else:
                raise StepFailed(f"api's sidecar let batch through (HTTP {status})")


# -- entry point -------------------------------------------------------------------


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM takes the same way out as Ctrl-C, so cleanup runs either way."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True, errors="replace")
    if not MESHID.exists():
        print(f"✗ {MESHID} not found: run 'make install' first", file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="meshid-demo-"))
    report = Report()
    print(f"meshid demo: an authority and three services with sidecars, all on {LOCALHOST}")
    print(f"working directory {root}")
    demo = Demo(root, report)
    status = 1
    with terminate_on_sigterm():
        try:
            demo.run()
            status = 0
        except StepFailed as exc:
            report.fail(str(exc))
        except KeyboardInterrupt:
            report.fail("interrupted")
            status = 130
        except Exception as exc:
            report.fail(f"unexpected {type(exc).__name__}: {exc}")
        finally:
            # A second Ctrl-C must not leave processes behind; stopping them is bounded.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print(f"\n[{report.elapsed()}] Cleaning up")
            for line in demo.cleanup():
                print(f"    {line}")
            if args.keep or status == 1:
                print(f"    logs and state kept in {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
    if status == 0:
        print(f"\n✓ demo finished: all {report.steps} steps did what they showed")
    else:
        print(f"\n✗ demo failed at step {report.steps}")
    return status


if __name__ == "__main__":
    sys.exit(main())
