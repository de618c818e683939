"""What limits each figure, and what would move it: prose with this run's numbers filled in.

The reasoning uses three kinds of evidence from the run: CPU seconds of every
process per unit of work (from /proc and wait4), how busy the load generator
was, and where the sidecars spent their samples (py-spy). Statements that
depend on the numbers are computed, not assumed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.profiling import Profile
    from bench.report import RunResult, WorkloadResult


def _share(profiles: list[Profile], *needles: str) -> float:
    """Mean share (%) over the sidecars of the categories whose name contains a needle."""
    if not profiles:
        return 0.0
    total = 0.0
    for p in profiles:
        total += sum(pct for name, pct in p.categories if any(n in name for n in needles))
    return total / len(profiles)


def _v(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _ratio(r: WorkloadResult, key: str) -> float | None:
    m, s = r.median("meshid", key), r.median("stunnel", key)
    return None if m is None or not s else m / s


def _cost(r: WorkloadResult, topo: str, proc: str, unit: str, prefix: str = "") -> float | None:
    return r.detail(topo, f"{prefix}{proc}: {unit}")


def _busy(r: WorkloadResult, topo: str, procs: tuple[str, ...], prefix: str = "") -> str:
    parts = []
    for p in procs:
        v = r.detail(topo, f"{prefix}{p}: CPU % of one core")
        parts.append(f"{p} {_v(v)} %")
    return ", ".join(parts)


def _bound(r: WorkloadResult, prefix: str = "") -> str:
    """Say whether a sidecar saturated its one thread, or the machine was the limit."""
    busy = [r.detail("meshid", f"{prefix}{p}: CPU % of one core") for p in MESHID]
    known = [b for b in busy if b is not None]
    if not known:
        return ""
    if max(known) >= 85:
        return (
            f"A sidecar is one thread and the busier one ran at {max(known):.0f} % of a core: "
            "it is CPU-bound on its own thread."
        )
    return (
        f"Neither sidecar filled its thread (at most {max(known):.0f} % of a core): they "
        "competed for the two vCPUs with the load generator, the backend, each other and "
        "other work on this machine, so the CPU cost per unit is the comparable figure."
    )


MESHID = ("meshid-web", "meshid-api")
STUNNEL = ("stunnel-client", "stunnel-server")


def _bulk(r: WorkloadResult) -> list[str]:
    unit = "CPU s per GiB"
    prof = r.profiles.get("meshid", [])
    up, down = _ratio(r, "up"), _ratio(r, "down")

    def cost(topo: str, proc: str) -> str:
        return _v(_cost(r, topo, proc, unit, "up: "), 2)

    lines = [
        f"**Bulk** (meshid/stunnel {_v(up, 2)}x up, {_v(down, 2)}x down; direct TCP "
        f"{_v(r.median('direct', 'up'))} MiB/s, so neither iperf3 nor the kernel limits the "
        "proxied figures).",
        f"CPU per GiB moved, client→server: web sidecar {cost('meshid', 'meshid-web')} s, "
        f"api sidecar {cost('meshid', 'meshid-api')} s; stunnel "
        f"{cost('stunnel', 'stunnel-client')} s and {cost('stunnel', 'stunnel-server')} s. "
        f"Busy: {_busy(r, 'meshid', MESHID, 'up: ')} "
        f"(stunnel: {_busy(r, 'stunnel', STUNNEL, 'up: ')}).",
        f"Profile: {_v(_share(prof, 'pyOpenSSL', 'TLS records'), 0)} % of the sidecars' samples "
        "are in OpenSSL's record layer and AES-GCM (native frames show up in the Python "
        "function that called them: the pump's `SSL_read`/`SSL_write` in tlsio.py, the "
        f"handshake in pyOpenSSL), {_v(_share(prof, 'trio'), 0)} % in trio's scheduler and "
        f"epoll, {_v(_share(prof, 'copy loop'), 0)} % in the pump itself (mostly its plain "
        f"`send`/`recv_into` system calls). {_bound(r, 'up: ')} Each pass moves up to four "
        "64 KiB chunks per direction before the pump serves other sockets. What would move "
        "it: fewer user-space passes per byte (kernel TLS via OpenSSL's `SSL_OP_ENABLE_KTLS`, "
        "which also allows `splice` on the plain side) and worker processes with "
        "`SO_REUSEPORT` for more than one stream; neither is a small change.",
    ]
    return lines


def _small(r: WorkloadResult) -> list[str]:
    unit = "CPU µs per request"
    prof = r.profiles.get("meshid", [])
    return [
        f"**Small requests** (meshid/stunnel {_v(_ratio(r, 'rps'), 2)}x; direct TCP "
        f"{_v(r.median('direct', 'rps'))} req/s with wrk at "
        f"{_v(r.detail('direct', 'wrk CPU % of its one thread'))} % of its thread, against "
        f"{_v(r.detail('meshid', 'wrk CPU % of its one thread'))} % through meshid: wrk is "
        "not the limit).",
        f"CPU per request: web sidecar {_v(_cost(r, 'meshid', 'meshid-web', unit))} µs, api "
        f"sidecar {_v(_cost(r, 'meshid', 'meshid-api', unit))} µs; stunnel "
        f"{_v(_cost(r, 'stunnel', 'stunnel-client', unit))} and "
        f"{_v(_cost(r, 'stunnel', 'stunnel-server', unit))} µs. Busy: "
        f"{_busy(r, 'meshid', MESHID)}. {_bound(r)} Each request crosses each sidecar "
        "twice (request and response). A crossing is one readiness event, handled inside the "
        "pump's batch with no task switch: one `SSL_read` (or plain `recv_into`) that returns "
        "the message and one plain `send` (or `SSL_write`). A lone short TLS record ends the "
        "read, so there is no probing read that fails, and registrations are level-triggered, "
        "so no `epoll_ctl` is made while bytes flow.",
        f"Profile: OpenSSL {_v(_share(prof, 'pyOpenSSL', 'TLS records'))} %, trio scheduler "
        f"and epoll {_v(_share(prof, 'trio'))} %, pump {_v(_share(prof, 'copy loop'))} % (its "
        "self time is mostly the `send`/`recv_into` system calls). What is left is the "
        "kernel's loopback TCP path, which stunnel pays too, and the Python that handles "
        "one event. What would move it: worker processes (one pump per core), or a C "
        "extension for the pump's inner loop.",
    ]


def _newconn(r: WorkloadResult) -> list[str]:
    unit = "CPU ms per connection"
    prof = r.profiles.get("meshid", [])
    hs = 0.0
    if prof:
        hs = sum(dict(p.inclusive).get("handshake", 0.0) for p in prof) / len(prof)
    profile = (
        f"Profile: `handshake` is on the stack in {_v(hs)} % of the sidecars' samples "
        f"(pyOpenSSL {_v(_share(prof, 'pyOpenSSL'))} % overall, most of it `do_handshake`: "
        if prof
        else "Profile: none taken in this run (`--no-profile`; with one, most of it is "
    )
    return [
        f"**New connections** (meshid/stunnel {_v(_ratio(r, 'cps'), 2)}x; direct TCP "
        f"{_v(r.median('direct', 'cps'))} conn/s, so wrk and nginx are far from the limit).",
        f"CPU per connection: web sidecar {_v(_cost(r, 'meshid', 'meshid-web', unit), 2)} ms, "
        f"api sidecar {_v(_cost(r, 'meshid', 'meshid-api', unit), 2)} ms; stunnel "
        f"{_v(_cost(r, 'stunnel', 'stunnel-client', unit), 2)} and "
        f"{_v(_cost(r, 'stunnel', 'stunnel-server', unit), 2)} ms. Busy: "
        f"{_busy(r, 'meshid', MESHID)} (stunnel: {_busy(r, 'stunnel', STUNNEL)}). {_bound(r)}",
        f"Resumed TLS handshakes: {_v(r.detail('meshid', 'meshid-web: % of connections resumed'))} "
        f"% of web's connections, {_v(r.detail('meshid', 'meshid-api: % of connections resumed'))}"
        " % of api's (the `resumed` field of the decision lines). The outbound sidecar keeps "
        "up to 32 single-use sessions per upstream, one put back as soon as the upstream's "
        "ticket arrives; the inbound one issues tickets under keys rotated every 15 minutes. "
        "A resumed handshake skips certificates and signatures but still does the hybrid "
        "post-quantum key exchange (X25519MLKEM768, one key share), and every resumed peer "
        "is judged again like a full one.",
        profile + "OpenSSL's C handshake: the key exchange, the key schedule's hashes, sealing and "
        "opening the ticket); the rest is the per-connection Python: accept, connect, two "
        "JSON decision-log lines, metrics, registry, and one trio task (the pump moves the "
        "connection's bytes), and the kernel's loopback TCP. What would move it: worker "
        "processes (the handshake is C and parallelises), a classical-only key share (about "
        "30 % less per resumed handshake, but the full handshake after each ticket-key "
        "rotation would then be classical too, losing the post-quantum protection), "
        "or a stateful server session cache (no ticket to seal, but about 12 KiB per full "
        "handshake held in memory, which pyOpenSSL gives no way to bound).",
    ]


def _idle(r: WorkloadResult) -> list[str]:
    m5 = [r.median("meshid", f"5000:{p}") for p in ("front", "back")]
    s5 = [r.median("stunnel", f"5000:{p}") for p in ("front", "back")]
    threads = r.detail("stunnel", "stunnel-client: threads @5000")
    return [
        f"**Idle connections**: meshid {_v(m5[0], 1)} KiB (web, outbound) and "
        f"{_v(m5[1], 1)} KiB (api, inbound) per connection at 5,000; stunnel "
        f"{_v(s5[0], 1)} and {_v(s5[1], 1)} KiB, with one thread per connection "
        f"({_v(threads)} threads in the client stunnel at 5,000: stack and per-thread "
        "buffers). A meshid connection idles holding no copy buffer (the pool lends one "
        "only while bytes move; `SSL_MODE_RELEASE_BUFFERS` frees OpenSSL's record buffers), "
        "so what remains is OpenSSL's SSL object and session (the inbound side also keeps "
        "the peer's certificate chain), the pyOpenSSL wrappers, one trio task waiting for "
        "the pump to finish the connection (with its coroutine frames and cancel scope), the "
        "pump's state for it, the registry entry and two sockets' objects. "
        "py-spy does not see memory; its profile of this workload shows the connection "
        "ramp. What would move it: dropping the peer certificate after the decision, and "
        "`__slots__` on the registry entry; each is a few KiB.",
    ]


def _ca(r: WorkloadResult) -> list[str]:
    rate = r.median("ca", "svids")
    server = r.detail("ca", "authority: CPU ms per SVID (all workers)")
    client = r.detail("ca", "load generator: CPU ms per SVID")
    busy = r.detail("ca", "authority: cores busy")
    return [
        f"**Control-plane signing** ({_v(rate)} SVIDs/s with two workers). Each renewal costs "
        f"the authority {_v(server, 2)} ms of CPU and the Python load generator {_v(client, 2)} "
        f"ms (it pipelines four renewals per connection and reads only status and length); "
        f"the authority kept {_v(busy, 2)} cores busy. On two cores shared with the load "
        "generator, the sum of the two bounds the rate. Per renewal: the caller's TLS record "
        "and HTTP parsing (h11), the CSR's signature check (ECDSA verify), building and "
        "signing the certificate (ECDSA sign), and the issuance and its audit entry in SQLite. "
        "Concurrent requests are signed in one transaction with one fsync (group commit), so "
        "durability costs little; the caller's verified SVID is remembered per bundle "
        "sequence. What would move it: more cores (workers scale until SQLite's single "
        "writer is the limit), a cheaper HTTP/TLS layer than trio's SSLStream + h11 in "
        "Python. Each worker listens on its own socket in a SO_REUSEPORT group; with few "
        "clients the kernel's hash can still load one worker more than the other.",
        *_ca_postgresql(r, rate),
    ]


def _ca_postgresql(r: WorkloadResult, sqlite: float | None) -> list[str]:
    """The same renewals with the trust domain in PostgreSQL, as ratios to SQLite's figure."""
    one, two = r.median("ca-pg1", "svids"), r.median("ca-pg2", "svids")
    if one is None and two is None:
        return []

    def share(x: float | None) -> str:
        return "n/a" if x is None or not sqlite else f"{x / sqlite:.2f}x"

    cpu = r.detail("ca-pg1", "authority: CPU ms per SVID (all workers)")
    database = r.detail("ca-pg1", "database: CPU ms per SVID")
    return [
        f"**On PostgreSQL** (same run, same clients): {_v(one)} SVIDs/s with one instance "
        f"({share(one)} SQLite's), {_v(two)} SVIDs/s with two instances of the trust domain, "
        f"each taking half the clients ({share(two)}). With one instance the authority spent "
        f"{_v(cpu, 2)} ms of CPU per SVID and the PostgreSQL server {_v(database, 2)} ms, on "
        "the same two cores. Every topology runs two server processes (two workers, or two "
        "instances of one worker each), so on this machine a second instance brings no CPU "
        "of its own: the figures compare the same two processes with the trust domain in "
        "SQLite, in PostgreSQL as one instance, and as two; on hosts of their own, instances "
        "add their cores. Each write is a round trip to the server, and the writers of every "
        "instance take one advisory lock in turn, as SQLite's single writer does.",
    ]


def _transparent(r: WorkloadResult) -> list[str]:
    """Captured against explicit: what differs is web's outbound side only."""
    per_conn = r.workload.name == "transparent-newconn"
    key, unit, digits = (
        ("cps", "CPU ms per connection", 2) if per_conn else ("rps", "CPU µs per request", 0)
    )
    mine, base = r.median("transparent", key), r.median("explicit", key)
    ratio = None if mine is None or not base else mine / base
    web = [_cost(r, t, "netns-meshid-web", unit) for t in ("transparent", "explicit")]
    api = [_cost(r, t, "netns-meshid-api", unit) for t in ("transparent", "explicit")]
    short = unit.split(" per ")[0].removeprefix("CPU ")
    prof = r.profiles.get("transparent", [])
    lookup = (
        sum(dict(p.inclusive).get("_destination", 0.0) for p in prof) / len(prof) if prof else None
    )
    what = "New connections" if per_conn else "Small requests"
    return [
        f"**Transparent interception, {what.lower()}** (transparent/explicit {_v(ratio, 2)}x). "
        f"CPU per {'connection' if per_conn else 'request'} at web's sidecar: "
        f"{_v(web[0], digits)} {short} captured, {_v(web[1], digits)} {short} explicit; at "
        f"api's, whose path is the same in both: {_v(api[0], digits)} and "
        f"{_v(api[1], digits)} {short}, which shows how far the machine's noise alone moves "
        "the figure.",
        "The two paths differ only at web's outbound side. Per connection: one getsockopt "
        "(`SO_ORIGINAL_DST`), one getsockname (a direct dial of the capture port is refused, "
        "not looped) and a lookup in the address map; the destination's text is parsed once "
        "per destination, not per connection."
        + (
            f" In the profile `_destination` is on the stack in {_v(lookup, 1)} % of web's samples."
            if lookup is not None
            else ""
        ),
        "Per packet, the kernel rewrites the addresses of the client's hop (NAT); nftables "
        "evaluates the nat chain on a connection's first packet only, and conntrack follows "
        "every packet on both paths, since the namespace has a nat table. What would move "
        "it: nothing in the sidecar's own code is left that scales with the capture; the "
        "rest is the explicit path's cost.",
    ]


ANALYSES = {
    "bulk": _bulk,
    "small": _small,
    "newconn": _newconn,
    "idle": _idle,
    "ca": _ca,
    "transparent-small": _transparent,
    "transparent-newconn": _transparent,
}


def analyse(run: RunResult) -> list[str]:
    lines = ["## What limits each figure, and what would move it", ""]
    for r in run.workloads:
        write = ANALYSES.get(r.workload.name)
        if write is None:
            continue
        lines += [" ".join(write(r)), ""]
    lines.append(
        "**The load generators**: wrk and iperf3 reach the direct-TCP figures above, "
        "several times the proxied ones, with the same command, so through a proxy they "
        "wait on the proxies. On two vCPUs every process competes for the same cores; "
        f"the load average was {run.load_before} before the run and {run.load_after} after "
        "(other sessions share this machine), which is why raw rates swing between runs."
    )
    return lines
