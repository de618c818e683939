"""A dynamic sidecar enrolling with a platform-issued JWT (`authority.jwt_file`).

Our authority's control plane in this process with a JWT attestor; the token
file is rewritten by the test as the kubelet would rotate it. A refusal a new
token can fix is retried (and the file read again); one it cannot ends the
real CLI with one line, and the authority logs the reason.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from attest_helpers import Issuer, cluster_attestor, sa_claims, unsigned
from sidecar_helpers import LogCapture, fmt, utcnow
from test_sidecar_control_failures import control_plane, make_authority, run_cli

from ca.authority import Authority
from meshid.errors import ConfigError
from meshid.events import EventLog
from meshid.svid import generate_key
from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.renewal import Pacing, build_csr
from sidecar.schedule import Schedule

FAST = Schedule(backoff_initial=0.02, backoff_max=0.05)
ID = "spiffe://example.org/ns/shop/sa/api"


def pod_dir(tmp: Path, authority: Authority, token: str) -> tuple[Path, Path]:
    """A pod's files: the bootstrap bundle, and the projected token (the config dir, the token)."""
    config_dir = tmp / "pod"
    (config_dir / "tokens").mkdir(parents=True)
    (config_dir / "bundle.pem").write_bytes(authority.bundle().to_pem())
    token_file = config_dir / "tokens" / "meshid"
    token_file.write_text(token)
    return config_dir, token_file


def attested_authority(tmp: Path) -> tuple[Authority, Issuer]:
    issuer = Issuer()
    issuer.new_key("k1")
    authority = make_authority(tmp / "authority")
    jwks = issuer.write_jwks(tmp / "jwks.json")
    authority.add_attestor(cluster_attestor(jwks, "cluster"))
    return authority, issuer


def jwt_doc(server: Any, state_dir: Path) -> dict[str, Any]:
    return {
        "identity": "ns/shop/sa/api",
        "trust_domain": "example.org",
        "authority": {
            "server": fmt(server),
            "bundle": "bundle.pem",
            "jwt_file": "tokens/meshid",
            "state_dir": str(state_dir),
        },
        "admin": {"listen": "127.0.0.1:0"},
        "outbound": [{"listen": "127.0.0.1:0", "upstream": "127.0.0.1:9", "identity": "api"}],
    }


async def test_a_sidecar_enrolls_with_its_service_account_token_and_retries_a_spent_one(
    tmp_path: Path,
) -> None:
    authority, issuer = attested_authority(tmp_path)
    spent = issuer.token(sa_claims(utcnow() - timedelta(minutes=1)), "k1")
    config_dir, token_file = pod_dir(tmp_path, authority, spent)
    # someone else used this very token first: the sidecar must wait for a fresh one
    first = authority.prepare_enroll_jwt(
        spent, build_csr(generate_key(), authority.resolve("ns/shop/sa/api"))
    )
    authority.commit(first)
    served = control_plane(authority)
    log = LogCapture()
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                addr = await nursery.start(served.plane.serve)
                sidecar = Sidecar(
                    parse_config(jwt_doc(addr, tmp_path / "state"), config_dir),
                    events=EventLog(log),
                    pacing=Pacing(schedule=FAST),
                )
                nursery.start_soon(sidecar.run)
                await log.wait_for("enroll_failed", count=2)
                refused = log.find("enroll_failed")
                assert {e["reason"] for e in refused} == {"jwt_replayed"}
                assert not any(e.get("permanent") for e in refused)
                # the kubelet rotates the projected token
                token_file.write_text(issuer.token(sa_claims(utcnow()), "k1") + "\n")
                await log.wait_for("started")
                svid = sidecar.current_svid()
                assert svid is not None and str(svid.spiffe_id) == ID
                nursery.cancel_scope.cancel()
    finally:
        authority.close()
    reasons = [r["reason"] for r in served.requests if r["path"] == "/v1/enroll"]
    assert "jwt_replayed" in reasons and reasons[-1] is None


@pytest.mark.parametrize(
    ("case", "reason"),
    [("audience", "jwt_audience"), ("issuer", "jwt_issuer"), ("alg_none", "jwt_algorithm")],
)
async def test_a_token_no_rotation_can_fix_ends_the_sidecar_with_one_line(
    tmp_path: Path, case: str, reason: str
) -> None:
    authority, issuer = attested_authority(tmp_path)
    now = utcnow()
    token = {
        "audience": lambda: issuer.token(sa_claims(now, audience="vault"), "k1"),
        "issuer": lambda: issuer.token(sa_claims(now, issuer="https://other.example"), "k1"),
        "alg_none": lambda: unsigned(sa_claims(now), "k1"),
    }[case]()
    config_dir, _ = pod_dir(tmp_path, authority, token)
    served = control_plane(authority)
    try:
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(served.plane.serve)
            doc = jwt_doc(addr, config_dir / "state")
            del doc["admin"], doc["outbound"]
            config = config_dir / "sidecar.toml"
            config.write_text(
                _toml(doc) + '[[outbound]]\nlisten = "127.0.0.1:0"\nupstream = "127.0.0.1:9"\n'
                'identity = "api"\n'
            )
            code, stderr = await run_cli(config)
            nursery.cancel_scope.cancel()
    finally:
        authority.close()
    assert code == 1, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "enrollment JWT refused" in lines[0], stderr
    assert "meshid" in lines[0] and "Traceback" not in stderr
    assert [r["reason"] for r in served.requests] == [reason]  # the authority's log says why


def _toml(doc: dict[str, Any]) -> str:
    top = "".join(f"{k} = {json.dumps(v)}\n" for k, v in doc.items() if not isinstance(v, dict))
    tables = "".join(
        f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())
        for name, table in doc.items()
        if isinstance(table, dict)
    )
    return top + tables


def test_token_file_and_jwt_file_are_exclusive(tmp_path: Path) -> None:
    doc = jwt_doc(("127.0.0.1", 1), tmp_path / "state")
    assert parse_config(doc, tmp_path).source.jwt_file == tmp_path / "tokens" / "meshid"
    doc["authority"]["token_file"] = "token"
    with pytest.raises(ConfigError, match=r"authority\.jwt_file: give token_file or jwt_file"):
        parse_config(doc, tmp_path)
    doc["authority"]["jwt_fil"] = doc["authority"].pop("jwt_file")
    with pytest.raises(ConfigError, match="jwt_file"):  # did you mean
        parse_config(doc, tmp_path)
