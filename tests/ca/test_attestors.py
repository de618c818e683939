"""Enrollment by platform identity: JWT attestors on the authority.

Tokens are shaped like a cluster's projected ServiceAccount tokens and signed
by an issuer key the test makes; every refusal has its reason, and the
positive twin (the same token, unaltered) enrolls.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from attest_helpers import (
    AUDIENCE,
    ISSUER,
    K8S_TEMPLATE,
    POD_UID,
    Issuer,
    Served,
    cluster_attestor,
    hs256_with_public_key,
    https_jwks,
    sa_claims,
    unsigned,
)
from ca_helpers import Clock, make_csr, run

from ca.authority import Authority
from ca.status import render_status
from ca.store import DB_NAME
from meshid.errors import InvalidInput, MeshIdError, StateError, TokenRejected
from meshid.jwtattest import Attestor
from meshid.svid import leaf_spiffe_id


@pytest.fixture
def issuer() -> Issuer:
    found = Issuer()
    found.new_key("k1")
    found.new_key("e1", ec_key=True)
    return found


@pytest.fixture
def jwks(issuer: Issuer, tmp_path: Path) -> Path:
    return issuer.write_jwks(tmp_path / "jwks.json")


@pytest.fixture
def k8s(authority: Authority, jwks: Path) -> Attestor:
    return authority.add_attestor(cluster_attestor(jwks, "cluster"))


def enroll(authority: Authority, token: str) -> str:
    _, csr = make_csr()
    issued = authority.commit(authority.prepare_enroll_jwt(token, csr))
    return str(leaf_spiffe_id(issued.leaf))


def refusal(authority: Authority, token: str) -> str:
    with pytest.raises(TokenRejected) as caught:
        enroll(authority, token)
    assert "\n" not in caught.value.message
    return caught.value.reason


@pytest.mark.parametrize("kid", ["k1", "e1"])
def test_a_service_account_token_enrolls_as_its_namespace_and_account(
    authority: Authority, k8s: Attestor, issuer: Issuer, clock: Clock, kid: str
) -> None:
    token = issuer.token(sa_claims(clock.now), kid)
    assert enroll(authority, token) == "spiffe://example.org/ns/shop/sa/api"
    assert authority.pod_uids() == {"spiffe://example.org/ns/shop/sa/api": [POD_UID]}
    status = "\n".join(render_status(authority))
    assert "spiffe://example.org/ns/shop/sa/api: 1 SVID(s) issued" in status
    assert f"enrolled by pod {POD_UID}" in status
    actions = [e.action for e in authority.store.audit_entries()]
    assert "attestor_add" in actions and "attest" in actions and "enroll_jwt" in actions


def _forged(issuer: Issuer, clock: Clock, case: str) -> str:
    now = clock.now
    claims: dict[str, Any] = sa_claims(now)
    if case == "audience":
        return issuer.token(sa_claims(now, audience="vault"), "k1")
    if case == "issuer":
        return issuer.token(sa_claims(now, issuer="https://elsewhere.example"), "k1")
    if case == "expired":
        return issuer.token(sa_claims(now - timedelta(hours=2)), "k1")
    if case == "not_yet_valid":
        return issuer.token(sa_claims(now + timedelta(minutes=10)), "k1")
    if case == "unknown_kid":
        stranger = Issuer()
        stranger.new_key("k9")
        return stranger.token(claims, "k9")
    if case == "wrong_key_known_kid":
        stranger = Issuer()
        stranger.new_key("k1")
        return stranger.token(claims, "k1")
    if case == "alg_none":
        return unsigned(claims, "k1")
    if case == "hs256_public_key":
        return hs256_with_public_key(claims, "k1", issuer.public_pem("k1"))
    if case == "missing_claim":
        del claims["kubernetes.io"]["serviceaccount"]
        return issuer.token(claims, "k1")
    if case == "no_exp":
        del claims["exp"]
        return issuer.token(claims, "k1")
    if case == "not_a_jwt":
        return "not-a-jwt"
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("audience", "jwt_audience"),
        ("issuer", "jwt_issuer"),
        ("expired", "jwt_expired"),
        ("not_yet_valid", "jwt_expired"),
        ("unknown_kid", "jwt_unknown_key"),
        ("wrong_key_known_kid", "jwt_signature"),
        ("alg_none", "jwt_algorithm"),
        ("hs256_public_key", "jwt_algorithm"),
        ("missing_claim", "jwt_claim"),
        ("no_exp", "jwt_malformed"),
        ("not_a_jwt", "jwt_malformed"),
    ],
)
def test_a_forged_or_unfit_token_is_refused_with_its_reason(
    authority: Authority, k8s: Attestor, issuer: Issuer, clock: Clock, case: str, reason: str
) -> None:
    assert refusal(authority, _forged(issuer, clock, case)) == reason
    # the positive twin: the issuer's own, fitting token
    assert enroll(authority, issuer.token(sa_claims(clock.now), "k1")).endswith("/sa/api")


def test_a_token_is_accepted_once(
    authority: Authority, k8s: Attestor, issuer: Issuer, clock: Clock
) -> None:
    token = issuer.token(sa_claims(clock.now), "k1")
    prepared = authority.prepare_enroll_jwt(token, make_csr()[1])
    again = authority.prepare_enroll_jwt(token, make_csr()[1])  # both before either commits
    authority.commit(prepared)
    with pytest.raises(TokenRejected) as caught:
        authority.commit(again)
    assert caught.value.reason == "jwt_replayed"
    assert refusal(authority, token) == "jwt_replayed"


def test_required_claims_must_match(
    authority: Authority, jwks: Path, issuer: Issuer, clock: Clock
) -> None:
    authority.add_attestor(
        Attestor(
            name="prod-only",
            issuer=ISSUER,
            audience=AUDIENCE,
            template=K8S_TEMPLATE,
            claims=(("kubernetes.io.namespace", "prod"),),
            jwks_file=str(jwks),
        )
    )
    assert refusal(authority, issuer.token(sa_claims(clock.now), "k1")) == "jwt_claim"
    token = issuer.token(sa_claims(clock.now, namespace="prod"), "k1")
    assert enroll(authority, token) == "spiffe://example.org/ns/prod/sa/api"


@pytest.mark.parametrize(
    "template",
    ["meshid/{sub}", "ns//{kubernetes.io.namespace}", "ns/{kubernetes.io.namespace", "fixed/path"],
)
def test_a_template_that_cannot_give_a_workload_id_is_refused(
    authority: Authority, jwks: Path, template: str
) -> None:
    with pytest.raises(InvalidInput):
        authority.add_attestor(
            Attestor(
                name="bad",
                issuer=ISSUER,
                audience=AUDIENCE,
                template=template,
                jwks_file=str(jwks),
            )
        )
    assert authority.attestors() == []


def test_claims_that_render_a_reserved_or_invalid_id_are_refused(
    authority: Authority, jwks: Path, issuer: Issuer, clock: Clock
) -> None:
    authority.add_attestor(
        Attestor(
            name="by-ns",
            issuer=ISSUER,
            audience=AUDIENCE,
            template="{kubernetes.io.namespace}/authority",
            jwks_file=str(jwks),
        )
    )
    with pytest.raises(MeshIdError) as caught:
        enroll(authority, issuer.token(sa_claims(clock.now, namespace="meshid"), "k1"))
    assert caught.value.reason == "reserved_id"
    claims = sa_claims(clock.now)
    claims["kubernetes.io"]["namespace"] = "../x"
    assert refusal(authority, issuer.token(claims, "k1")) == "jwt_claim"
    assert enroll(authority, issuer.token(sa_claims(clock.now), "k1")) == (
        "spiffe://example.org/shop/authority"
    )


def test_a_rotated_key_in_the_jwks_file_is_picked_up_without_a_restart(
    authority: Authority, k8s: Attestor, issuer: Issuer, jwks: Path, clock: Clock
) -> None:
    assert enroll(authority, issuer.token(sa_claims(clock.now), "k1"))
    issuer.new_key("k2")
    token = issuer.token(sa_claims(clock.now, sa="web"), "k2")
    assert refusal(authority, token) == "jwt_unknown_key"
    issuer.write_jwks(jwks)
    assert enroll(authority, token) == "spiffe://example.org/ns/shop/sa/web"


def test_the_jwks_url_over_https_with_a_rate_limited_refresh(
    authority: Authority, issuer: Issuer, clock: Clock, tmp_path: Path
) -> None:
    with https_jwks(issuer, tmp_path, clock.now) as (url, tls):
        authority.jwks_tls = tls
        authority.add_attestor(
            Attestor(
                name="oidc", issuer=ISSUER, audience=AUDIENCE, template=K8S_TEMPLATE, jwks_url=url
            )
        )
        assert enroll(authority, issuer.token(sa_claims(clock.now), "k1")).endswith("/sa/api")
        issuer.new_key("k2")
        token = issuer.token(sa_claims(clock.now, sa="web"), "k2")
        assert refusal(authority, token) == "jwt_unknown_key"  # fetched at enrollment: too soon
        clock.advance(timedelta(seconds=31))
        assert enroll(authority, token) == "spiffe://example.org/ns/shop/sa/web"


def test_a_jwks_url_with_an_untrusted_certificate_is_refused(
    authority: Authority, issuer: Issuer, clock: Clock, tmp_path: Path
) -> None:
    with https_jwks(issuer, tmp_path, clock.now) as (url, _), pytest.raises(StateError) as caught:
        authority.add_attestor(
            Attestor(
                name="oidc", issuer=ISSUER, audience=AUDIENCE, template=K8S_TEMPLATE, jwks_url=url
            )
        )
    assert "cannot read the JWKS" in caught.value.message


def test_an_issuer_that_is_down_is_not_asked_again_for_every_unknown_kid(
    authority: Authority, issuer: Issuer, clock: Clock, tmp_path: Path
) -> None:
    served = Served()
    with https_jwks(issuer, tmp_path, clock.now, served=served) as (url, tls):
        authority.jwks_tls = tls
        authority.add_attestor(cluster_attestor(Path("unused"), jwks_file=None, jwks_url=url))
        assert enroll(authority, issuer.token(sa_claims(clock.now), "k1"))
        asked = served.requests
        served.failing = True
        clock.advance(timedelta(seconds=31))
        forged = Issuer()
        forged.new_key("k9")
        for _ in range(5):  # a stream of unknown kids: one read, which fails
            assert refusal(authority, forged.token(sa_claims(clock.now), "k9")) == (
                "jwt_unknown_key"
            )
        assert served.requests == asked + 1
        # the keys already held keep working while the issuer is down
        assert enroll(authority, issuer.token(sa_claims(clock.now, sa="web"), "k1"))
        served.failing = False
        clock.advance(timedelta(seconds=31))
        issuer.new_key("k2")
        assert enroll(authority, issuer.token(sa_claims(clock.now, sa="db"), "k2"))
        assert served.requests == asked + 2


def test_a_jwks_url_that_redirects_is_refused(
    authority: Authority, issuer: Issuer, clock: Clock, tmp_path: Path
) -> None:
    plain = "http://127.0.0.1:9/openid/v1/jwks"  # where anyone on the path could answer
    with https_jwks(issuer, tmp_path, clock.now, redirect=plain) as (url, tls):
        authority.jwks_tls = tls
        with pytest.raises(StateError) as caught:
            authority.add_attestor(cluster_attestor(Path("unused"), jwks_file=None, jwks_url=url))
    assert "redirects" in caught.value.message
    assert authority.attestors() == []


def test_attestors_are_listed_removed_and_audited(
    authority: Authority, k8s: Attestor, issuer: Issuer, clock: Clock
) -> None:
    assert [a.name for a in authority.attestors()] == ["cluster"]
    authority.remove_attestor("cluster")
    assert authority.attestors() == []
    assert refusal(authority, issuer.token(sa_claims(clock.now), "k1")) == "jwt_issuer"
    removed = [e for e in authority.store.audit_entries() if e.action == "attestor_remove"]
    assert json.loads(json.dumps(removed[0].details))["name"] == "cluster"


def test_the_attestor_commands(state: Path, jwks: Path, issuer: Issuer) -> None:
    added = run(
        "ca", "attestor", "add", "cluster", "--state", str(state), "--issuer", ISSUER,
        "--jwks", str(jwks), "--audience", AUDIENCE, "--template", K8S_TEMPLATE,
        "--claim", "kubernetes.io.namespace=shop",
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    listed = run("ca", "attestor", "list", "--json", "--state", str(state))
    assert json.loads(listed.output)[0]["claims"] == {"kubernetes.io.namespace": "shop"}
    bad = run(
        "ca", "attestor", "add", "evil", "--state", str(state), "--issuer", "https://x.example",
        "--jwks", str(jwks), "--audience", AUDIENCE, "--template", "meshid/{sub}",
    )  # fmt: skip
    assert bad.exit_code == 1 and "reserved" in bad.output and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) == 1
    gone = run("ca", "attestor", "remove", "cluster", "--state", str(state))
    assert gone.exit_code == 0
    assert json.loads(run("ca", "attestor", "list", "--json", "--state", str(state)).output) == []
    assert run("ca", "attestor", "remove", "cluster", "--state", str(state)).exit_code == 1


def test_a_version_3_database_gains_the_attestor_tables(
    state: Path, clock: Clock, jwks: Path, issuer: Issuer
) -> None:
    conn = sqlite3.connect(state / DB_NAME)
    with conn:
        conn.execute("DROP TABLE attestors")
        conn.execute("DROP TABLE used_jwts")
        conn.execute("UPDATE settings SET value = '3' WHERE name = 'schema_version'")
    conn.execute("PRAGMA user_version = 3")
    conn.close()
    authority = Authority.open(state, clock=clock)
    try:
        authority.add_attestor(cluster_attestor(jwks, "cluster"))
        assert enroll(authority, issuer.token(sa_claims(clock.now), "k1")).endswith("/sa/api")
        assert authority.store.verify_audit()[1] is None
    finally:
        authority.close()
