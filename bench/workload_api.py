"""Workload API bench: memory per idle stream, and how fast a renewal reaches 1,000 streams.

    python -m bench.workload_api [--streams 1000] [--per-connection 1]

A server process runs the sidecar's Workload API server (the real
`serve_workload_api`, on a Unix socket in a temporary directory) over SVIDs
issued by our own authority; this process opens the streams with raw HTTP/2
clients (one `FetchX509SVID` stream each, `--per-connection` streams per
connection), waits for every first message, and reads the server's RSS
(VmRSS) before and after. Then it asks the server to install a new SVID
(SIGUSR1) and times until every stream has received it. The clients share
this one process and its core with nothing else, but the machine's cores
are shared with the server: the time includes parsing 1,000 messages here.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import h2.connection
import h2.events
import trio

SERVICE = "/SpiffeWorkloadAPI/FetchX509SVID"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# -- the server process -----------------------------------------------------------


async def _serve(socket_path: Path, state: Path) -> None:
    from ca.authority import Authority
    from meshid.clock import ManualClock, system_clock
    from meshid.events import EventLog
    from meshid.spiffeid import SpiffeId, TrustDomain
    from meshid.svid import generate_key
    from sidecar.credentials import Svid
    from sidecar.workload.run import serve_workload_api
    from sidecar.workload.settings import WorkloadApiConfig

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    td = TrustDomain("example.org")
    web = SpiffeId(td, "/web")
    born = datetime.now(UTC) - timedelta(hours=1)
    Authority.init(state / "ca", td, clock=ManualClock(born)).close()
    authority = Authority.open(state / "ca", clock=system_clock())

    def issue() -> Svid:
        key = generate_key()
        issued = authority.issue(web, key.public_key())
        return Svid.check(list(issued.chain), key, authority.bundle(), web, datetime.now(UTC))

    svids = [issue() for _ in range(4)]

    class Host:
        identity = web
        events = EventLog(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
        svid_listeners: list = []  # type: ignore[type-arg]  # noqa: RUF012
        svid = svids[0]

        def current_svid(self) -> Svid:
            return self.svid

        def wall_now(self) -> datetime:
            return datetime.now(UTC)

    host = Host()
    config = WorkloadApiConfig(socket_path, frozenset({os.getuid()}), frozenset())
    with trio.open_signal_receiver(signal.SIGUSR1) as renewals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_workload_api, host, config)
            print("ready", flush=True)
            count = 0
            async for _ in renewals:
                count += 1
                host.svid = svids[count % len(svids)]
                for listener in host.svid_listeners:
                    listener(host.svid)


# -- the clients -------------------------------------------------------------------


@dataclass
class _Conn:
    stream: trio.SocketStream
    h2: h2.connection.H2Connection
    counts: dict[int, int] = field(default_factory=dict)
    buffers: dict[int, bytearray] = field(default_factory=dict)


async def _open(path: Path, streams: int) -> _Conn:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    conn = _Conn(trio.SocketStream(sock), h2.connection.H2Connection())
    conn.h2.initiate_connection()
    for _ in range(streams):
        sid = conn.h2.get_next_available_stream_id()
        conn.h2.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":authority", "localhost"),
                (":path", SERVICE),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("workload.spiffe.io", "true"),
            ],
        )
        conn.h2.send_data(sid, b"\x00\x00\x00\x00\x00", end_stream=True)
        conn.counts[sid] = 0
        conn.buffers[sid] = bytearray()
    await conn.stream.send_all(conn.h2.data_to_send())
    return conn


async def _read(conn: _Conn, total: list[int]) -> None:
    while True:
        data = await conn.stream.receive_some(1 << 20)
        if not data:
            return
        for event in conn.h2.receive_data(data):
            if isinstance(event, h2.events.DataReceived) and event.stream_id in conn.counts:
                sid = event.stream_id
                conn.h2.acknowledge_received_data(event.flow_controlled_length, sid)
                buf = conn.buffers[sid]
                buf += event.data or b""
                while len(buf) >= 5:
                    size = struct.unpack_from(">I", buf, 1)[0]
                    if len(buf) < 5 + size:
                        break
                    del buf[: 5 + size]
                    conn.counts[sid] += 1
                    total[conn.counts[sid]] = total[conn.counts[sid]] + 1
        pending = conn.h2.data_to_send()
        if pending:
            await conn.stream.send_all(pending)


async def _bench(streams: int, per_connection: int) -> dict[str, float]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    directory = Path(tempfile.mkdtemp(prefix="wlb", dir="/tmp"))
    path = directory / "api.sock"
    argv = [sys.executable, "-m", "bench.workload_api", "--serve", str(path)]
    server = await trio.lowlevel.open_process(
        [*argv, "--state", str(directory)],
        stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        with trio.fail_after(120):
            line = b""
            while b"ready" not in line:
                line += await server.stdout.receive_some()
        await trio.sleep(0.5)
        base = _rss_kib(server.pid)
        total = [0] * 64
        async with trio.open_nursery() as nursery:
            conns = []
            for _ in range(streams // per_connection):
                conn = await _open(path, per_connection)
                conns.append(conn)
                nursery.start_soon(_read, conn, total)
            with trio.fail_after(120):
                while total[1] < streams:  # noqa: ASYNC110 - a poll, as a client would see it
                    await trio.sleep(0.01)
            await trio.sleep(0.5)
            loaded = _rss_kib(server.pid)
            start = time.perf_counter()
            server.send_signal(signal.SIGUSR1)
            with trio.fail_after(120):
                while total[2] < streams:  # noqa: ASYNC110 - 1 ms resolution is enough here
                    await trio.sleep(0.001)
            elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        return {
            "streams": streams,
            "per_connection": per_connection,
            "rss_base_kib": base,
            "rss_loaded_kib": loaded,
            "kib_per_stream": (loaded - base) / streams,
            "renewal_to_all_s": elapsed,
        }
    finally:
        server.kill()
        await server.wait()
        _remove(directory)


def _remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--per-connection", type=int, default=1)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        trio.run(_serve, args.serve, args.state)
        return
    results = trio.run(_bench, args.streams, args.per_connection)
    print(
        f"Workload API, {results['streams']:.0f} idle FetchX509SVID streams "
        f"({results['per_connection']:.0f} per connection): "
        f"{results['kib_per_stream']:.1f} KiB RSS per stream "
        f"(server {results['rss_base_kib']:.0f} -> {results['rss_loaded_kib']:.0f} KiB); "
        f"renewal to every stream holding the new SVID: {results['renewal_to_all_s'] * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
