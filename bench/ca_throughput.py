"""The control plane's signing throughput: SVIDs issued per second over the API.

A real `meshid ca serve` process; concurrent clients, each on its own
keep-alive mTLS connection with its own SVID, renew in a loop with CSRs for
fresh keys generated before the clock starts (key generation is the
workload's cost, not the authority's). Every request is a full renewal:
client certificate verified, CSR parsed and its signature checked, a
certificate signed, the issuance recorded in the database and the audit
chain. Client CPU is reported beside the server's, to show which side limits.

    python -m bench.ca_throughput [--clients 16] [--requests 3000] [--repetitions 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bench.procs import Supervisor, cpu_seconds, free_ports, wait_listening
from ca.authority import Authority
from meshid.clock import system_clock
from meshid.spiffeid import SpiffeId, TrustDomain
from meshid.svid import certs_to_pem, generate_key, key_to_pem
from sidecar.renewal import build_csr

TD = TrustDomain("bench.example")
SOURCES = 8  # client source addresses, 127.0.0.2 up
PIPELINE = 4  # renewals in flight per connection
MESHID = str(Path(sys.executable).with_name("meshid"))


@dataclass
class Result:
    svids_per_s: float
    requests: int
    wall_s: float
    server_cpu_s: float
    database_cpu_s: float  # a PostgreSQL server's, when there is one
    client_cpu_s: float
    errors: int


def _tree_cpu(pid: int) -> float:
    """CPU of a process and its direct children (the server's workers)."""
    total = cpu_seconds(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        with contextlib.suppress(OSError):
            total += cpu_seconds(int(child))
    return total


def _servers_cpu(pids: Sequence[int]) -> float:
    return sum(_tree_cpu(pid) for pid in pids)


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _request(csr: str) -> bytes:
    """One renewal, as bytes on the wire; built before the clock starts."""
    body = json.dumps({"csr": csr, "bundle_sequence": 1}).encode()
    head = (
        "POST /v1/renew HTTP/1.1\r\nhost: ca\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _client(
    port: int,
    ctx: ssl.SSLContext,
    requests: list[bytes],
    counts: list[int],
    index: int,
    ready: trio.Semaphore,
    go: trio.Event,
) -> None:
    """Renew over one kept-alive connection, PIPELINE requests in flight at a time.

    The connection and its handshake are made before the clock starts (`ready`,
    then `go`): what is measured is signing, not TLS handshakes.

    The load generator only needs each answer's status and length (the server
    always sends Content-Length), so it reads those itself rather than spend
    on a full HTTP parser the CPU that the server under test needs.
    """
    # Sidecars connect from many hosts; the control plane caps connections still
    # in their handshake per source address, so the clients spread over 127/8.
    source = f"127.0.0.{2 + index % SOURCES}"
    tcp = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    stream = trio.SSLStream(tcp, ctx, server_hostname=None)
    pending = b""
    try:
        await stream.do_handshake()
        ready.release()
        await go.wait()
        for start in range(0, len(requests), PIPELINE):
            batch = requests[start : start + PIPELINE]
            await stream.send_all(b"".join(batch))
            for _ in batch:
                while (end := pending.find(b"\r\n\r\n")) < 0:
                    pending += await _more(stream)
                head, pending = pending[:end], pending[end + 4 :]
                status = int(head[9:12])
                length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                while len(pending) < length:
                    pending += await _more(stream)
                pending = pending[length:]
                counts[index if status == 200 else -1] += 1
    finally:
        await trio.aclose_forcefully(stream)


async def _more(stream: trio.SSLStream[trio.SocketStream]) -> bytes:
    data = await stream.receive_some(65536)
    if not data:
        raise trio.BrokenResourceError("server closed the connection")
    return bytes(data)


def client_contexts(state: Path, workdir: Path, clients: int) -> list[ssl.SSLContext]:
    authority = Authority.open(state, clock=system_clock())
    contexts = []
    try:
        for i in range(clients):
            key = generate_key()
            issued = authority.issue(SpiffeId(TD, f"/bench/client-{i}"), key.public_key())
            cert, keyfile = workdir / f"client-{i}.pem", workdir / f"client-{i}.key"
            cert.write_bytes(certs_to_pem(issued.chain))
            keyfile.write_bytes(key_to_pem(key))
            keyfile.chmod(0o600)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.check_hostname = False
            ctx.load_verify_locations(cadata=authority.bundle().to_pem().decode())
            ctx.load_cert_chain(cert, keyfile)
            contexts.append(ctx)
    finally:
        authority.close()
    return contexts


def _requests(clients: int, per_client: int) -> list[list[bytes]]:
    return [
        [
            _request(build_csr(generate_key(), SpiffeId(TD, f"/bench/client-{i}")).decode())
            for _ in range(per_client)
        ]
        for i in range(clients)
    ]


def measure(
    workdir: Path, clients: int, requests: int, repetitions: int, workers: int = 2
) -> list[Result]:
    state = workdir / "ca"
    subprocess.run(
        [MESHID, "ca", "init", "--state", str(state), "--trust-domain", TD.name],
        check=True,
        capture_output=True,
    )
    (port,) = free_ports(1)
    results = []
    with Supervisor(workdir) as sup:
        server = sup.start(
            "ca-serve",
            [MESHID, "ca", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}"],
        )
        wait_listening([server], [port])
        contexts = client_contexts(state, workdir, clients)
        for _ in range(repetitions):
            results.append(run_once([port], contexts, requests, [server.pid]))
            server.check_alive()
    return results


def run_once(
    ports: Sequence[int],
    contexts: list[ssl.SSLContext],
    requests: int,
    server_pids: Sequence[int],
    database_pids: Sequence[int] = (),
) -> Result:
    """One repetition: every client renews its share of `requests`, concurrently.

    With several ports (instances of one trust domain), client i asks port
    i mod len(ports), so the load is shared evenly; the server CPU is theirs summed.
    """
    clients = len(contexts)
    wire = _requests(clients, max(1, requests // clients))
    counts = [0] * (clients + 1)
    clock: dict[str, float] = {}

    async def main() -> None:
        ready, go = trio.Semaphore(0), trio.Event()
        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:
                for i in range(clients):
                    port = ports[i % len(ports)]
                    nursery.start_soon(_client, port, contexts[i], wire[i], counts, i, ready, go)
                for _ in range(clients):
                    await ready.acquire()
                clock["server_cpu"], clock["client_cpu"] = _servers_cpu(server_pids), _self_cpu()
                clock["database_cpu"] = _servers_cpu(database_pids)
                clock["start"] = time.perf_counter()
                go.set()
        clock["wall"] = time.perf_counter() - clock["start"]
        clock["server_cpu"] = _servers_cpu(server_pids) - clock["server_cpu"]
        clock["database_cpu"] = _servers_cpu(database_pids) - clock["database_cpu"]
        clock["client_cpu"] = _self_cpu() - clock["client_cpu"]

    trio.run(main)
    wall = clock["wall"]
    ok = sum(counts[:-1])
    return Result(
        svids_per_s=ok / wall,
        requests=ok,
        wall_s=wall,
        server_cpu_s=clock["server_cpu"],
        database_cpu_s=clock["database_cpu"],
        client_cpu_s=clock["client_cpu"],
        errors=counts[-1],
    )


def summarise(results: list[Result]) -> dict[str, Any]:
    med = statistics.median(r.svids_per_s for r in results)
    return {
        "svids_per_s_median": round(med, 1),
        "runs": [round(r.svids_per_s, 1) for r in results],
        "errors": sum(r.errors for r in results),
        "server_cpu_per_svid_ms": round(
            1000 * statistics.median(r.server_cpu_s / max(r.requests, 1) for r in results), 3
        ),
        "client_cpu_per_svid_ms": round(
            1000 * statistics.median(r.client_cpu_s / max(r.requests, 1) for r in results), 3
        ),
        "server_cpu_share": round(statistics.median(r.server_cpu_s / r.wall_s for r in results), 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="meshid ca serve --workers")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="meshid-ca-bench-"))
    try:
        results = measure(workdir, args.clients, args.requests, args.repetitions, args.workers)
        print(json.dumps(summarise(results), indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
