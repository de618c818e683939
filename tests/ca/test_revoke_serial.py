"""`meshid ca revoke --serial S`: one SVID revoked, carried by the feed, refused at renewal."""

from __future__ import annotations

from pathlib import Path

import pytest
from ca_helpers import make_csr, run, snapshot
from cryptography import x509

from ca.authority import Authority
from meshid.clock import system_clock
from meshid.errors import IdentityRevoked
from meshid.feedwire import Feed
from meshid.spiffeid import SpiffeId

WEB = SpiffeId.parse("spiffe://example.org/web")

BACKENDS = ("sqlite", "postgresql")  # every test here runs on both engines


def _issue(state: Path, out: Path) -> x509.Certificate:
    assert run("ca", "issue", "web", "--out", str(out), "--state", str(state)).exit_code == 0
    return x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[0]


def test_revoke_by_serial_reaches_the_feed_and_refuses_renewal(state: Path, tmp_path: Path) -> None:
    revoked = _issue(state, tmp_path / "a")
    kept = _issue(state, tmp_path / "b")
    serial = f"{revoked.serial_number:x}"
    result = run("ca", "revoke", "--serial", serial.upper(), "--state", str(state))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"revoked SVID {serial} of {WEB} (revocation version 1)\n"
    authority = Authority.open(state, clock=system_clock())
    try:
        feed = Feed.parse(authority.feed(WEB))
        assert feed.revoked_serials == (revoked.serial_number,)
        assert feed.revoked == () and feed.revocation_version == 1
        assert Feed.parse(feed.to_json()) == feed
        assert authority.store.audit_entries()[-1].action == "revoke_serial"
        with pytest.raises(IdentityRevoked):
            authority.renew(revoked, make_csr()[1])
        assert authority.renew(kept, make_csr()[1]).spiffe_id == WEB  # the identity lives on
    finally:
        authority.close()


def test_a_feed_without_serials_reads_as_none_revoked() -> None:
    doc = {
        "policy_version": 0,
        "revocation_version": 0,
        "bundle_sequence": 1,
        "pairs": [],
        "revoked": [],
        "bundle": "-----BEGIN CERTIFICATE-----",
    }
    assert Feed.parse(doc).revoked_serials == ()


def test_revoke_serial_refuses_bad_input_in_one_line(state: Path, tmp_path: Path) -> None:
    issued = _issue(state, tmp_path / "a")
    before = snapshot(state)
    for args in (
        ("--serial", "zz"),
        ("--serial", "abc123"),  # never issued here
        ("web", "--serial", f"{issued.serial_number:x}"),  # both
        (),  # neither
    ):
        result = run("ca", "revoke", *args, "--state", str(state))
        assert result.exit_code != 0, args
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, args
    assert snapshot(state) == before
    serial = f"{issued.serial_number:x}"
    assert run("ca", "revoke", "--serial", serial, "--state", str(state)).exit_code == 0
    again = run("ca", "revoke", "--serial", serial, "--state", str(state))
    assert again.exit_code == 1 and "already revoked" in again.stderr


def test_the_one_lookup_of_a_caller_sees_a_revoked_serial(state: Path, tmp_path: Path) -> None:
    """What the management routes ask of each caller: its identity or this very SVID."""
    revoked = _issue(state, tmp_path / "a")
    kept = _issue(state, tmp_path / "b")
    revoke = run("ca", "revoke", "--serial", f"{revoked.serial_number:x}", "--state", str(state))
    assert revoke.exit_code == 0, revoke.output
    authority = Authority.open(state, clock=system_clock())
    try:
        assert authority.revocation(WEB, revoked.serial_number) == 1
        assert authority.revocation(WEB, kept.serial_number) is None
        assert authority.revocation(WEB) is None  # the identity itself is not revoked
    finally:
        authority.close()
