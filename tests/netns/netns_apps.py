"""The apps of the multi-host test, run inside a network namespace with `ip netns exec`.

python netns_apps.py backend HOST:PORT
    The api app: for each connection, read the PROXY v2 header from api's
    sidecar, then answer one HTTP request with the caller's SPIFFE ID and
    address ("caller=spiffe://... src=198.18.0.2:40000"). Prints
    "listening" once bound and "served ..." per answer (flushed).

python netns_apps.py echo HOST:PORT
    An app that sends back every byte it receives, per connection, until the
    caller closes. Prints "listening" once bound.

python netns_apps.py hold HOST:PORT
    A long-lived client: connects (printing "connected"), sends each line
    read from stdin and prints what comes back ("echo ping 1"), until the
    connection ends: then prints "cut: eof" or "cut: reset" and exits 0.
    Gives up after 60 s ("gave up", exit 4).

python netns_apps.py get HOST:PORT [--cert C --key K --bundle B]
    A client: one GET, plain TCP or (with --cert) TLS with that SVID.
    Prints the response body and exits 0 on HTTP 200; prints
    "refused: ..." and exits 3 when the connection is refused or cut.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import socketserver
import ssl
import sys
import time

from sidecar.proxyproto import PP2_TYPE_SPIFFE_ID, decode_v2

REFUSED = 3
GAVE_UP = 4
HOLD_LIMIT = 60.0


def split_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class Backend(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        data = b""
        try:
            while len(data) < 16 or len(data) < 16 + int.from_bytes(data[14:16], "big"):
                chunk = sock.recv(4096)
                if not chunk:
                    return
                data += chunk
            src, _dst, tlvs, end = decode_v2(data)
            rest = data[end:]
            while b"\r\n\r\n" not in rest:
                chunk = sock.recv(4096)
                if not chunk:
                    return
                rest += chunk
            caller = tlvs.get(PP2_TYPE_SPIFFE_ID, b"").decode()
            body = f"caller={caller} src={src[0]}:{src[1]}\n"
            sock.sendall(f"HTTP/1.0 200 OK\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
            print(f"served {body.strip()}", flush=True)
        except (OSError, ValueError) as exc:
            print(f"failed {exc}", flush=True)


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            while data := sock.recv(4096):
                sock.sendall(data)
        except OSError:
            return


def serve(listen: str, handler: type[socketserver.BaseRequestHandler]) -> int:
    with Server(split_addr(listen), handler) as server:
        print("listening", flush=True)
        server.serve_forever()
    return 0


def hold(target: str) -> int:
    """One connection kept open, fed from stdin, until the other end ends it."""
    sock = socket.create_connection(split_addr(target), timeout=10)
    print("connected", flush=True)
    sock.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(sys.stdin, selectors.EVENT_READ)
    deadline = time.monotonic() + HOLD_LIMIT
    pending = b""
    while (left := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(left):
            if key.fileobj is sys.stdin:
                line = sys.stdin.readline()
                if not line:
                    selector.unregister(sys.stdin)
                    continue
                sock.setblocking(True)
                sock.sendall(line.encode())
                sock.setblocking(False)
                continue
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                print("cut: reset", flush=True)
                return 0
            except BlockingIOError:
                continue
            except OSError as exc:
                print(f"cut: {exc.strerror}", flush=True)
                return 0
            if not data:
                print("cut: eof", flush=True)
                return 0
            pending += data
            while b"\n" in pending:
                line_, _, pending = pending.partition(b"\n")
                print(f"echo {line_.decode()}", flush=True)
    print("gave up", flush=True)
    return GAVE_UP


def get(target: str, cert: str | None, key: str | None, bundle: str | None) -> int:
    addr = split_addr(target)
    try:
        with socket.create_connection(addr, timeout=10) as raw:
            sock: socket.socket = raw
            if cert is not None:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False  # an SVID names a SPIFFE ID; the CA is still checked
                ctx.load_verify_locations(bundle)
                ctx.load_cert_chain(cert, key)
                sock = ctx.wrap_socket(raw)
            sock.sendall(b"GET / HTTP/1.0\r\nHost: api\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except (OSError, ssl.SSLError) as exc:
        print(f"refused: {exc}")
        return REFUSED
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200"):
        print(f"refused: {'connection closed without an answer' if not data else head!r}")
        return REFUSED
    print(body.decode().strip())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("backend").add_argument("listen")
    sub.add_parser("echo").add_argument("listen")
    sub.add_parser("hold").add_argument("target")
    client = sub.add_parser("get")
    client.add_argument("target")
    client.add_argument("--cert")
    client.add_argument("--key")
    client.add_argument("--bundle")
    args = parser.parse_args()
    if args.command == "backend":
        return serve(args.listen, Backend)
    if args.command == "echo":
        return serve(args.listen, Echo)
    if args.command == "hold":
        return hold(args.target)
    return get(args.target, args.cert, args.key, args.bundle)


if __name__ == "__main__":
    sys.exit(main())
