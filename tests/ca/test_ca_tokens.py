"""Join tokens: printed once, stored only as a hash, single use, and they expire."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from ca_helpers import Clock, make_csr, query, run

from ca.authority import Authority
from ca.values import DEFAULT_TOKEN_TTL, TOKEN_PREFIX, token_hash
from meshid.errors import IdentityRevoked, StateError, TokenRejected

BACKENDS = ("sqlite", "postgresql")  # every test here runs on both engines


def test_token_is_printed_alone_and_stored_only_as_a_hash(state: Path) -> None:
    result = run("ca", "token", "--state", str(state), "web", "--dns", "web.internal")
    assert result.exit_code == 0, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n"  # only the token, so `$(meshid ca token …)` works
    assert token.startswith(TOKEN_PREFIX)
    assert len(token) > 40
    secret = token.removeprefix(TOKEN_PREFIX).encode()
    for path in state.rglob("*"):  # database, its WAL, keys, bundle: nowhere
        if path.is_file():
            assert secret not in path.read_bytes(), path
    assert query(state, "SELECT hash FROM tokens") == [(token_hash(token),)]


def test_two_tokens_for_one_id_differ(authority: Authority) -> None:
    web = authority.resolve("web")
    assert authority.create_token(web) != authority.create_token(web)


def test_token_enrolls_once(authority: Authority) -> None:
    token = authority.create_token(authority.resolve("web"))
    assert authority.enroll(token, make_csr()[1]).spiffe_id == authority.resolve("web")
    with pytest.raises(TokenRejected) as info:
        authority.enroll(token, make_csr()[1])
    assert info.value.reason == "token_used"
    assert token not in info.value.message
    assert authority.token_grant(token) is None


def test_unknown_token_is_refused(authority: Authority) -> None:
    authority.create_token(authority.resolve("web"))
    with pytest.raises(TokenRejected) as info:
        authority.enroll(TOKEN_PREFIX + "not-a-real-token", make_csr()[1])
    assert info.value.reason == "token_unknown"
    assert "not-a-real-token" not in info.value.message


@pytest.mark.parametrize(
    ("age", "reason"),
    [
        (DEFAULT_TOKEN_TTL - timedelta(seconds=1), None),  # positive twin: just in time
        (DEFAULT_TOKEN_TTL, "token_expired"),
        (DEFAULT_TOKEN_TTL + timedelta(days=1), "token_expired"),
    ],
)
def test_token_expires(
    authority: Authority, state: Path, clock: Clock, age: timedelta, reason: str | None
) -> None:
    token = authority.create_token(authority.resolve("web"))
    clock.advance(age)  # the authority's own clock: no second authority, no waiting
    if reason is None:
        assert authority.enroll(token, make_csr()[1])
        return
    assert authority.token_grant(token) is None
    with pytest.raises(TokenRejected) as info:
        authority.enroll(token, make_csr()[1])
    assert info.value.reason == reason


def test_custom_token_ttl(authority: Authority, clock: Clock) -> None:
    token = authority.create_token(authority.resolve("web"), ttl=timedelta(minutes=1))
    clock.advance(timedelta(minutes=1, seconds=1))
    with pytest.raises(TokenRejected, match="expired"):
        authority.enroll(token, make_csr()[1])


def test_grant_carries_the_sans_given_with_the_token(authority: Authority) -> None:
    token = authority.create_token(authority.resolve("web"), dns_names=["Web.Internal."])
    grant = authority.token_grant(token)
    assert grant is not None
    assert grant.spiffe_id == authority.resolve("web")
    assert grant.dns_names == ("web.internal",)


def test_revocation_burns_outstanding_tokens(authority: Authority) -> None:
    web = authority.resolve("web")
    token = authority.create_token(web)
    authority.revoke(web)
    with pytest.raises(TokenRejected):
        authority.enroll(token, make_csr()[1])
    with pytest.raises(IdentityRevoked):
        authority.create_token(web)
    # the twin: another identity is untouched
    assert authority.enroll(authority.create_token(authority.resolve("api")), make_csr()[1])


def test_a_failure_to_sign_does_not_consume_the_token(state: Path, clock: Clock) -> None:
    key_file = state / "keys" / "root-1.key"
    good_key = key_file.read_bytes()
    key_file.write_bytes(b"not a key")
    authority = Authority.open(state, clock=clock)
    try:
        token = authority.create_token(authority.resolve("web"))
        with pytest.raises(StateError, match="not a PEM private key"):
            authority.enroll(token, make_csr()[1])
        assert authority.token_grant(token) is not None
    finally:
        authority.close()
    key_file.write_bytes(good_key)
    again = Authority.open(state, clock=clock)
    try:
        assert again.enroll(token, make_csr()[1]).spiffe_id == again.resolve("web")
    finally:
        again.close()
