"""Two control planes of one trust domain, on real sockets, over one PostgreSQL database."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import trio
from ca_helpers import TD, Clock, query, run
from test_server import csr_pem, write_identity

from ca.authority import Authority
from ca.backend import Database
from ca.jwtkeys import JwtKeyring
from ca.server import ControlPlane, ServerOptions
from meshid.jwtsvid import MAX_TTL as JWT_MAX_TTL
from meshid.jwtsvid import keys_from_jwks, validate
from meshid.spiffeid import SpiffeId
from meshid.svid import generate_key
from sidecar.control import ControlClient, ControlPlaneError
from sidecar.dynamic import build_csr

WEB = SpiffeId(TD, "/web")
USES = 16


@asynccontextmanager
async def serving(
    state: Path, clock: Clock, log: Callable[..., None] = lambda event, **f: None
) -> AsyncIterator[tuple[Authority, int]]:
    """One instance's control plane on 127.0.0.1 port 0, and a handle of its own."""
    served = Authority.open(state, clock=clock)
    mine = Authority.open(state, clock=clock)
    server = ControlPlane(
        served,
        ServerOptions(host="127.0.0.1", port=0, request_timeout=5.0, poll_interval=0.05),
        log=log,
        clock=clock,
    )
    try:
        async with trio.open_nursery() as nursery:
            _host, port = await nursery.start(server.serve)
            yield mine, port
            nursery.cancel_scope.cancel()
    finally:
        mine.close()
        served.close()


async def test_one_token_used_sixteen_times_across_two_instances_gives_one_svid(
    tmp_path: Path, pg_url: str, clock: Clock
) -> None:
    Authority.init(tmp_path / "one", TD, clock=clock, database=Database(pg_url, "one")).close()
    Authority.join(
        tmp_path / "two",
        Database(pg_url, "two"),
        audit_key=tmp_path / "one" / "audit.key",
        propagation=timedelta(0),
        clock=clock,
    ).close()
    with trio.fail_after(60):
        async with (
            serving(tmp_path / "one", clock) as (one, port_one),
            serving(tmp_path / "two", clock) as (_two, port_two),
        ):
            token = one.create_token(WEB)
            bundle = one.bundle().to_pem()
            outcomes: list[Any] = []

            async def use(port: int) -> None:
                client = ControlClient("127.0.0.1", port, TD)
                body = {"token": token, "csr": build_csr(generate_key(), WEB).decode()}
                try:
                    reply = await client.request(
                        "POST", "/v1/enroll", body, bundle_pem=bundle, now=clock()
                    )
                    outcomes.append(("ok", port, reply["spiffe_id"]))
                except ControlPlaneError as exc:
                    outcomes.append((exc.reason, port, exc.status))

            async with trio.open_nursery() as nursery:
                for n in range(USES):
                    nursery.start_soon(use, (port_one, port_two)[n % 2])
    assert len(outcomes) == USES
    assert [o[2] for o in outcomes if o[0] == "ok"] == [str(WEB)]
    # the others are refused: the token is spent (or, past five failures, the source is
    # rate-limited: the failure limiter, shared by the instances, sees one source here)
    assert {o[0] for o in outcomes if o[0] != "ok"} <= {"token_used", "rate_limited"}
    assert "token_used" in {o[0] for o in outcomes}
    assert {o[1] for o in outcomes} == {port_one, port_two}  # both instances answered
    enrolled = query(tmp_path / "one", "SELECT COUNT(*) FROM svids WHERE how = 'enroll'")
    assert enrolled == [(1,)]
    heard = query(tmp_path / "two", "SELECT name FROM instances WHERE last_heard IS NOT NULL")
    assert sorted(heard) == [("one",), ("two",)]


async def test_a_joining_instance_serves_once_its_root_passed_the_gate(
    tmp_path: Path, pg_url: str, clock: Clock
) -> None:
    Authority.init(tmp_path / "one", TD, clock=clock, database=Database(pg_url, "one")).close()
    Authority.join(
        tmp_path / "two",
        Database(pg_url, "two"),
        audit_key=tmp_path / "one" / "audit.key",
        propagation=timedelta(minutes=1),
        clock=clock,
    ).close()
    log: list[tuple[str, dict[str, Any]]] = []
    waiting, started = trio.Event(), trio.Event()

    def record(event: str, **fields: Any) -> None:
        log.append((event, fields))
        if event == "waiting_for_root":
            waiting.set()

    async def serve_two() -> None:
        async with serving(tmp_path / "two", clock, record) as (_two, _port):
            started.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_two)
            await waiting.wait()
            assert log[0][0] == "waiting_for_root"
            assert log[0][1]["reason"] == "root_pending" and log[0][1]["generation"] == 2
            assert not started.is_set()
            clock.advance(timedelta(minutes=1, seconds=1))
            await started.wait()
    assert [event for event, _ in log].count("waiting_for_root") == 1
    assert any(event == "serving" for event, _ in log)


async def test_a_jwt_svid_minted_by_one_instance_validates_with_the_other_s_bundle(
    tmp_path: Path, pg_url: str, clock: Clock
) -> None:
    """Each instance signs with JWT keys of its own; every instance serves all of them,
    a removed instance's until the tokens it may have signed have expired."""
    Authority.init(tmp_path / "one", TD, clock=clock, database=Database(pg_url, "one")).close()
    Authority.join(
        tmp_path / "two",
        Database(pg_url, "two"),
        audit_key=tmp_path / "one" / "audit.key",
        propagation=timedelta(0),
        clock=clock,
    ).close()
    logged: dict[str, list[dict[str, Any]]] = {"one": [], "two": []}

    def logger(name: str) -> Callable[..., None]:
        return lambda event, **fields: logged[name].append({"event": event, **fields})

    with trio.fail_after(60):
        async with (
            serving(tmp_path / "one", clock, logger("one")) as (one, port_one),
            serving(tmp_path / "two", clock, logger("two")) as (two, port_two),
        ):
            bundle = one.bundle().to_pem()
            web = write_identity(tmp_path / "web", two, WEB)

            async def call(port: int, method: str, target: str, body: Any = None) -> Any:
                client = ControlClient("127.0.0.1", port, TD)
                return await client.request(
                    method, target, body, bundle_pem=bundle, now=clock(), identity=web
                )

            async def validated_by_one(token: str) -> SpiffeId:
                """As a sidecar of instance one validates: with the bundle one serves."""
                keys = keys_from_jwks(await call(port_one, "GET", "/v1/bundle"))
                subject, _claims = validate(token, "db", {TD: keys}, clock())
                return subject

            ask = {"spiffe_id": str(WEB), "audience": ["db"]}
            by_two = (await call(port_two, "POST", "/v1/jwt-svid", ask))["token"]
            # which instance issued is in its log: a renewal through two names two
            renewed = await call(port_two, "POST", "/v1/renew", {"csr": csr_pem(WEB)})
            [line] = [e for e in logged["two"] if e.get("path") == "/v1/renew"]
            assert (line["instance"], line["serial"]) == ("two", renewed["serial"])
            assert not [e for e in logged["one"] if e.get("path") == "/v1/renew"]
            by_one = (await call(port_one, "POST", "/v1/jwt-svid", ask))["token"]
            assert await validated_by_one(by_two) == WEB
            assert await validated_by_one(by_one) == WEB
            own = JwtKeyring(tmp_path / "one", clock).bundle_entries()
            assert len(keys_from_jwks(await call(port_two, "GET", "/v1/bundle"))) == 2 * len(own)
            printed = run("ca", "bundle", "--format", "spiffe", "--state", str(tmp_path / "one"))
            assert len(keys_from_jwks(json.loads(printed.stdout))) == 2 * len(own)
            # the private halves never leave their state directories
            rows = query(tmp_path / "one", "SELECT instance, jwk FROM jwt_keys ORDER BY instance")
            assert [r[0] for r in rows] == ["one", "two"]
            assert all('"d"' not in str(r[1]) for r in rows)

            one.remove_instance("two")
            assert await validated_by_one(by_two) == WEB  # its tokens may still be in use
            # then its keys leave once the longest token they may have signed has expired
            clock.advance(JWT_MAX_TTL - timedelta(seconds=1))
            assert len(one.shared_jwt_keys()) == len(own)
            clock.advance(timedelta(seconds=2))
            assert one.shared_jwt_keys() == []
    # at once, for a key that may be in other hands: what it signed validates nowhere now
    three = Authority.join(
        tmp_path / "three",
        Database(pg_url, "three"),
        audit_key=tmp_path / "one" / "audit.key",
        propagation=timedelta(0),
        clock=clock,
    )
    one = Authority.open(tmp_path / "one", clock=clock)
    try:
        assert len(one.shared_jwt_keys()) == len(own)  # three's, published by its join
        one.remove_instance("three", at_once=True)
        assert one.shared_jwt_keys() == []
        # a removed instance still running, rotating its key: nobody serves the new one
        keyring = JwtKeyring(tmp_path / "three", clock)
        keyring.rotate()
        three.publish_jwt_keys(keyring.bundle_entries())
        rows = query(tmp_path / "one", "SELECT kid FROM jwt_keys WHERE instance = 'three'")
        assert len(rows) == len(own)  # the new key is in the table, not in any bundle
        assert one.shared_jwt_keys() == []
    finally:
        one.close()
        three.close()
