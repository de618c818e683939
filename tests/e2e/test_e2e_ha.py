"""The highly available authority, whole: two `meshid ca serve` instances of one trust
domain over one PostgreSQL database, and sidecars that name them.

Each instance is a state directory of its own (`one` made by `ca init --database`,
`two` by `ca join`) with a signing root of its own; they meet only through the
database (tests/ca/pg_cluster.py starts a throwaway server per test worker).
What is checked is what an operator relies on:

- a change made on one instance reaches the sidecars attached to the other,
  and cuts their live connections, within 2 s;
- a sidecar that names both instances rides out one of them dying (SIGKILL,
  under traffic) without a failed request, and renews through the other;
- the database going away costs requests a 503 with Retry-After and a logged
  reason, never the sidecars' current SVIDs, and the instance recovers alone.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator

import psycopg
import pytest
import trio
from harness import (
    Addr,
    LiveConnection,
    Mesh,
    Probe,
    Result,
    Traffic,
    fmt,
    meshid,
    now,
    sid,
    wait_until,
)

from meshid.spiffeid import SpiffeId
from meshid.svid import generate_key
from sidecar.renewal import build_csr
from tests.ca.pg_cluster import PASSWORD_ROLE, PgCluster, running_cluster

DEADLINE = 2.0  # seconds from the command's exit, as for one instance
PASSWORD = "pw-Qe81x-must-never-show"


@pytest.fixture
def own_pg() -> Iterator[PgCluster]:
    """A PostgreSQL server for one test alone: that test stops and starts it."""
    with running_cluster() as cluster:
        yield cluster


async def renew(probe: Probe, addr: Addr) -> tuple[int, dict[str, str], dict[str, object]]:
    """One POST /v1/renew with the probe's SVID, as a sidecar makes it: status, headers, body."""
    csr = build_csr(generate_key(), SpiffeId.parse(sid(probe.name))).decode()
    body = json.dumps({"csr": csr, "bundle_sequence": 1}).encode()
    head = (
        f"POST /v1/renew HTTP/1.1\r\nHost: ca\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with trio.fail_after(10):
        tcp = await trio.open_tcp_stream(*addr)
        stream = trio.SSLStream(tcp, probe.context(probe.authority.bundle_pem()))
        async with stream:
            await stream.send_all(head + body)
            raw = b""
            while b"\r\n\r\n" not in raw:  # bounded by the deadline and by EOF
                raw += await receive_some(stream)
            top, _, payload = raw.partition(b"\r\n\r\n")
            status_line, *lines = top.decode().split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)
            }
            while len(payload) < int(headers["content-length"]):
                payload += await receive_some(stream)
    return int(status_line.split()[1]), headers, json.loads(payload)


@pytest.mark.slow
async def test_a_deny_on_one_instance_cuts_connections_of_sidecars_on_the_other(
    mesh: Mesh, app: Addr, pg_url: str
) -> None:
    """Slow (about 15 s): two instances and two sidecars, each sidecar attached to one.

    The probe (a client with an SVID of its own, no sidecar) talks straight to
    api's inbound, so only api's sidecar, which hears instance two alone, can
    cut its connection when the deny is made through instance one.
    """
    with trio.fail_after(100):
        one, two = await mesh.start_instances("--database", pg_url)
        await two.allow("web", "api")  # made on two, obeyed by web, which hears one
        await two.allow("probe", "api")
        api = await mesh.sidecar("api", forward=app, servers=[two])
        web = await mesh.sidecar("web", outbound=[("api", api.inbound)], servers=[one])
        probe = Probe("probe", mesh.root / "probe", two)
        await probe.issue()
        await web.log.wait_for("policy", where=lambda r: r["pairs"] == 1)  # its own pairs
        await api.log.wait_for("policy", where=lambda r: r["pairs"] == 2)

        web_live = await LiveConnection.open(web.outbound())
        probe_live = await probe.open_live(api.inbound, "api")

        # deny probe -> api through one: api, on two, cuts the probe's connection
        api_mark = api.log.mark()
        denied = await one.deny("probe", "api")
        cut_at = await probe_live.wait_cut(within=10)
        assert cut_at - denied.exited_at < DEADLINE
        [heard] = await api.log.wait_for("policy", since=api_mark)
        assert heard["closed_connections"] == 1
        [close] = await api.log.wait_for("close", since=api_mark, peer_id=sid("probe"))
        assert close["reason"] == "policy_revoked"
        assert await web_live.still_works(b"the other pair is untouched")

        # deny web -> api through one: the live connection between the two sidecars is cut,
        # and api, on two, has heard the deny within the same 2 s
        api_mark = api.log.mark()
        denied = await one.deny("web", "api")
        cut_at = await web_live.wait_cut(within=10)
        assert cut_at - denied.exited_at < DEADLINE
        [heard] = await api.log.wait_for("policy", since=api_mark, within=DEADLINE + 1)
        assert heard["_seen"] - denied.exited_at < DEADLINE
        assert heard["pairs"] == 0

        # the instances are two: each sidecar only ever spoke to its own
        assert web.log.find("authority_failover") == api.log.find("authority_failover") == []


RUN = 60.0  # seconds of traffic
KILL_AT = 20.0  # seconds into the run: after the first renewals, before the second


@pytest.mark.slow  # about 75 s
@pytest.mark.alone  # zero failed requests at 10 a second, not on a crowded machine
@pytest.mark.timeout(200)
async def test_one_instance_killed_under_traffic_costs_no_request_and_renewals_go_on(
    mesh: Mesh, app: Addr, pg_url: str
) -> None:
    """A new connection every 100 ms from web to api, both naming both instances, with
    30 s SVIDs (renewed every 15 s or so); the instance they use is SIGKILLed a third of
    the way in. No request fails, and every SVID issued after the kill is the
    survivor's (signed by its own root, recorded as such in the database)."""
    with trio.fail_after(180):
        one, two = await mesh.start_instances("--database", pg_url, svid_ttl="30s")
        await one.allow("web", "api")
        steady = {"close_on_peer_expiry": False}  # the long-lived connection outlives SVIDs
        api = await mesh.sidecar("api", forward=app, limits=steady)
        web = await mesh.sidecar("web", outbound=[("api", api.inbound)], limits=steady)
        await web.log.wait_for("policy", where=lambda r: r["pairs"] == 1)
        for car in (api, web):
            assert await car.metric("meshid_authority_server", server=fmt(one.addr)) == 1

        traffic = Traffic(web.outbound, rate=10.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(traffic.run, RUN + 10)
            start = now()
            with trio.move_on_at(start + KILL_AT):
                await traffic.stop.wait()  # pacing: the kill is due then
            assert traffic.failures == [], traffic.failures
            assert one.server is not None
            killed_wall = time.time()
            assert await one.server.stop(signal.SIGKILL) == -signal.SIGKILL
            killed = now()
            with trio.move_on_at(start + RUN):
                await traffic.stop.wait()
            traffic.stop.set()

        assert traffic.failures == [], traffic.failures
        assert traffic.ok >= RUN * 10 / 2, traffic.ok  # paced at 10/s: most were made
        assert traffic.live_exchanges >= RUN / 2, traffic.live_exchanges
        for car in (api, web):
            [moved, *_] = await car.log.wait_for("authority_failover")
            assert (moved["left"], moved["to"]) == (fmt(one.addr), fmt(two.addr))
            assert moved["_seen"] >= killed
            # every SVID issued after the kill is two's, and the sidecar installed it
            signers = svid_instances(pg_url, sid(car.name), killed_wall)
            assert set(signers.values()) == {"two"}, signers
            assert set(signers) <= set(car.serials("renewed")), (signers, car.serials())
            assert await car.metric("meshid_authority_server", server=fmt(two.addr)) == 1


def svid_instances(url: str, spiffe_id: str, since: float) -> dict[str, str]:
    """Serial -> the instance whose root signed it, for the SVIDs of `spiffe_id` issued
    after `since` (a Unix time), read straight from the shared database."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT s.serial, r.instance FROM svids s JOIN roots r USING (generation) "
            "WHERE s.spiffe_id = %s AND s.issued_at > %s",
            (spiffe_id, since),
        ).fetchall()
    return {str(serial): str(instance) for serial, instance in rows}


@pytest.mark.slow
async def test_the_database_going_away_costs_requests_a_503_never_the_sidecars_svids(
    mesh: Mesh, app: Addr, own_pg: PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Slow (about 20 s): PostgreSQL stopped under a running `ca serve`, then started again.

    The instance connects with a password from a file; every line any process
    or command wrote is searched for it at the end.
    """
    own_pg.set_password(PASSWORD)
    url = own_pg.url(own_pg.create_database(), user=PASSWORD_ROLE)
    secret = tmp_path_factory.mktemp("secret") / "db.password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    outputs: list[Result] = []
    with trio.fail_after(100):
        ca = mesh.authority
        await ca.init("1h", "--database", url, "--database-password-file", secret,
                      "--instance", "one")  # fmt: skip
        await ca.serve()
        assert ca.log is not None and ca.addr is not None
        outputs.append(await ca.allow("web", "api"))
        api = await mesh.sidecar("api", forward=app)
        web = await mesh.sidecar("web", outbound=[("api", api.inbound)])
        probe = Probe("probe", mesh.root / "probe", ca)
        await probe.issue()
        status, _, _ = await renew(probe, ca.addr)
        assert status == 200
        serials = {car.name: car.serials() for car in (api, web)}
        live = await LiveConnection.open(web.outbound())

        async with trio.open_nursery() as nursery:
            traffic = Traffic(web.outbound, rate=10.0)
            nursery.start_soon(traffic.run, 60.0)
            await wait_until(lambda: _value(traffic.ok >= 5), what="traffic flowing")

            mark = ca.log.mark()
            sidecar_marks = {car.name: car.log.mark() for car in (api, web)}
            await trio.to_thread.run_sync(own_pg.stop)
            status, headers, body = await renew(probe, ca.addr)
            assert status == 503, body
            assert body["error"] == "storage_unavailable"
            assert int(headers["retry-after"]) > 0
            [failed] = await ca.log.wait_for("poll_failed", since=mark)
            assert failed["reason"] == "storage_unavailable"
            [logged, *_] = await ca.log.wait_for("request", since=mark, status=503)
            assert logged["reason"] == "storage_unavailable"
            assert ca.server is not None and ca.server.running
            # the sidecars serve on with what they hold: new connections, the live one
            for car in (api, web):  # each has asked the instance and had the 503
                [told] = await car.log.wait_for("report_failed", since=sidecar_marks[car.name])
                assert told["reason"] == "storage_unavailable"
            ok_before = traffic.ok
            await wait_until(lambda: _value(traffic.ok >= ok_before + 10), what="traffic on")
            assert await live.still_works(b"while the database is down")

            await trio.to_thread.run_sync(own_pg.start)
            await ca.log.wait_for("poll_recovered", since=mark, reason="storage_unavailable")
            status, _, body = await renew(probe, ca.addr)
            assert status == 200, body
            changed = await meshid("policy", "allow", "probe", "api", "--state", ca.state)
            outputs.append(changed.check())
            await api.log.wait_for("policy", since=0, where=lambda r: r["pairs"] == 2)
            traffic.stop.set()

        assert traffic.failures == [], traffic.failures
        assert await live.still_works(b"after")
        await live.aclose()
        for car in (api, web):  # no renewal was needed, and none was lost
            assert car.serials() == serials[car.name]
        await mesh.procs.stop_all()

    written = [r.stdout + r.stderr for r in outputs]
    written += [
        f.read_text(errors="replace")
        for f in mesh.root.rglob("*")
        if f.is_file() and f.suffix in (".log", ".jsonl", ".txt")
    ]
    assert len(written) > 6
    assert not [text for text in written if PASSWORD in text]


async def receive_some(stream: trio.abc.ReceiveStream) -> bytes:
    data = await stream.receive_some(65536)
    if not data:
        raise EOFError("the control plane closed the connection mid-answer")
    return bytes(data)


async def _value(flag: bool) -> bool:
    return flag
