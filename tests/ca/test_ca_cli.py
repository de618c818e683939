"""Every error path of `meshid ca …` and `meshid policy …`.

Each case: a non-zero exit, exactly one line on stderr, nothing on stdout, no
traceback, and the state exactly as it was. Most run in-process with click's
CliRunner; the ones marked `real` also run through the installed console
script, where an escaped exception would show as a traceback.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ca_helpers import MESHID, TD, Clock, raw_files, run, snapshot

from ca.authority import Authority
from meshid.clock import system_clock
from meshid.errors import StateError

PASSPHRASE = "right horse battery"


@dataclass(frozen=True)
class Places:
    state: Path  # an initialised authority
    sealed: Path  # one whose root key is encrypted with PASSPHRASE
    tmp: Path

    def format(self, text: str) -> str:
        return text.format(state=self.state, sealed=self.sealed, tmp=self.tmp)


@pytest.fixture
def places(state: Path, tmp_path: Path) -> Places:
    sealed = tmp_path / "sealed"
    Authority.init(sealed, TD, passphrase=PASSPHRASE.encode(), clock=system_clock()).close()
    (tmp_path / "right").write_text(PASSPHRASE + "\n")
    (tmp_path / "wrong").write_text("wrong horse\n")
    (tmp_path / "empty-pass").write_text("")
    (tmp_path / "empty-dir").mkdir()
    return Places(state, sealed, tmp_path)


def _garbage_key(p: Places) -> None:
    (p.state / "keys" / "root-1.key").write_bytes(b"this is not a key\n")


def _no_key(p: Places) -> None:
    (p.state / "keys" / "root-1.key").unlink()


def _with_authority(action: Callable[[Authority], object]) -> Callable[[Places], None]:
    def setup(p: Places) -> None:
        authority = Authority.open(p.state, clock=system_clock())
        try:
            action(authority)
        finally:
            authority.close()

    return setup


_revoke_web = _with_authority(lambda a: a.revoke(a.resolve("web")))


@dataclass(frozen=True)
class Case:
    name: str
    command: str  # formatted with Places, then split like a shell would
    message: str  # a fragment of the one line on stderr
    watch: str = "{state}"  # the directory that must not change
    code: int = 1  # 2 for usage errors caught by click
    setup: Callable[[Places], None] | None = None
    real: bool = False  # also run through the console script


CASES = [
    # identities
    Case("bad trust domain", "ca init --state {tmp}/new --trust-domain Example.org",
         "must be lowercase", watch="{tmp}/new", real=True),
    Case("trust domain with a path", "ca init --state {tmp}/new --trust-domain example.org/web",
         "has no path", watch="{tmp}/new"),
    Case("bad ID", "ca token --state {state} web//db", "empty segment"),
    Case("bad ID on issue", "ca issue --state {state} 'a b' --out {tmp}/out",
         "path may only hold"),
    Case("ID of another trust domain", "ca token --state {state} spiffe://other.org/web",
         "belongs to trust domain other.org", real=True),
    Case("ID of another trust domain in a pair",
         "policy allow web spiffe://other.org/api --state {state}",
         "trust domain other.org is not federated with example.org"),
    Case("trust domain ID as a workload", "ca token --state {state} spiffe://example.org",
         "needs a path"),
    Case("bad DNS SAN", "ca token --state {state} web --dns 'not a name'", "not a DNS name"),
    Case("bad IP SAN", "ca issue --state {state} web --out {tmp}/out --ip 10.0.0.300",
         "not an IP address"),
    # durations
    Case("bad duration", "ca token --state {state} web --ttl 1x", "not a duration", code=2,
         real=True),
    Case("zero duration", "ca init --state {tmp}/new --trust-domain example.org --svid-ttl 0s",
         "longer than zero", watch="{tmp}/new", code=2),
    Case("SVID TTL under 30s at init",
         "ca init --state {tmp}/new --trust-domain example.org --svid-ttl 29s",
         "shorter than the minimum 30s", watch="{tmp}/new", real=True),
    Case("root TTL not above SVID TTL",
         "ca init --state {tmp}/new --trust-domain example.org --svid-ttl 1h --root-ttl 1h",
         "root lifetime must be longer", watch="{tmp}/new"),
    Case("SVID TTL under 30s at issue", "ca issue --state {state} web --out {tmp}/out --ttl 10s",
         "shorter than the minimum 30s"),
    # the state directory
    Case("missing state dir", "ca token --state {tmp}/missing web", "no such directory",
         watch="{tmp}/missing", real=True),
    Case("missing state dir for policy", "policy list --state {tmp}/missing",
         "no such directory", watch="{tmp}/missing"),
    Case("directory without an authority", "ca bundle --state {tmp}/empty-dir",
         "no authority here", watch="{tmp}/empty-dir"),
    Case("already initialised", "ca init --state {state} --trust-domain example.org",
         "already holds an authority", real=True),
    Case("already initialised, other domain", "ca init --state {state} --trust-domain other.org",
         "already holds an authority"),
    Case("output path is a file", "ca issue --state {state} web --out {state}/bundle.pem",
         "is a file", code=2),
    # the root key
    Case("garbage root key", "ca issue --state {state} web --out {tmp}/out",
         "not a PEM private key", setup=_garbage_key, real=True),
    Case("missing root key", "ca issue --state {state} web --out {tmp}/out",
         "cannot read root key", setup=_no_key),
    Case("wrong passphrase",
         "ca issue --state {sealed} web --out {tmp}/out --passphrase-file {tmp}/wrong",
         "wrong passphrase", watch="{sealed}", real=True),
    Case("no passphrase", "ca issue --state {sealed} web --out {tmp}/out",
         "root key is encrypted", watch="{sealed}"),
    Case("empty passphrase file",
         "ca issue --state {sealed} web --out {tmp}/out --passphrase-file {tmp}/empty-pass",
         "is empty", watch="{sealed}"),
    Case("missing passphrase file",
         "ca issue --state {sealed} web --out {tmp}/out --passphrase-file {tmp}/nope",
         "cannot read passphrase file", watch="{sealed}"),
    Case("rotate an encrypted authority without its passphrase", "ca rotate --state {sealed}",
         "root key is encrypted", watch="{sealed}", real=True),
    Case("rotate an encrypted authority with a wrong passphrase",
         "ca rotate --state {sealed} --passphrase-file {tmp}/wrong",
         "wrong passphrase", watch="{sealed}"),
    # the allow-list and revocation
    Case("token for a revoked ID", "ca token --state {state} web", "is revoked",
         setup=_revoke_web, real=True),
    Case("issue for a revoked ID", "ca issue --state {state} web --out {tmp}/out", "is revoked",
         setup=_revoke_web),
    Case("revoke twice", "ca revoke --state {state} web", "already revoked", setup=_revoke_web),
]  # fmt: skip


def _watched(path: Path) -> dict[str, str] | None:
    return snapshot(path) if path.exists() else None


def _check_one_line(code: int, stdout: str, stderr: str, case: Case) -> None:
    assert code == case.code, stderr
    assert "Traceback" not in stdout + stderr
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ")
    assert case.message in lines[0]


def _prepare(places: Places, case: Case) -> tuple[list[str], Path, dict[str, str] | None]:
    if case.setup is not None:
        case.setup(places)
    watch = Path(places.format(case.watch))
    return shlex.split(places.format(case.command)), watch, _watched(watch)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_error_path_in_process(places: Places, case: Case) -> None:
    args, watch, before = _prepare(places, case)
    result = run(*args)
    assert isinstance(result.exception, SystemExit), result.exception
    _check_one_line(result.exit_code, result.stdout, result.stderr, case)
    assert _watched(watch) == before
    assert not (places.tmp / "out").exists()


REAL = [c for c in CASES if c.real]


@pytest.mark.parametrize("case", REAL, ids=[c.name for c in REAL])
def test_error_path_through_the_console_script(places: Places, case: Case) -> None:
    args, watch, before = _prepare(places, case)
    proc = subprocess.run([MESHID, *args], capture_output=True, text=True, check=False, timeout=60)
    _check_one_line(proc.returncode, proc.stdout, proc.stderr, case)
    assert _watched(watch) == before


def test_init_over_an_authority_touches_no_byte(state: Path) -> None:
    before = raw_files(state)
    proc = subprocess.run(
        [MESHID, "ca", "init", "--state", state, "--trust-domain", "example.org"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 1
    assert raw_files(state) == before  # contents and mtimes


# --- the positive twins ---------------------------------------------------------


def test_right_passphrase_from_file_or_environment(places: Places) -> None:
    s, out = str(places.sealed), places.tmp / "out"
    by_file = run("ca", "issue", "--state", s, "web", "--out", str(out / "1"),
                  "--passphrase-file", str(places.tmp / "right"))  # fmt: skip
    assert by_file.exit_code == 0, by_file.stderr
    by_env = run("ca", "issue", "--state", s, "web", "--out", str(out / "2"),
                 env={"MESHID_CA_PASSPHRASE": PASSPHRASE})  # fmt: skip
    assert by_env.exit_code == 0, by_env.stderr
    assert (out / "2" / "svid.pem").exists()


def test_rotate_keeps_every_root_key_encrypted(places: Places) -> None:
    s, right = str(places.sealed), str(places.tmp / "right")
    rotated = run("ca", "rotate", "--state", s, "--propagation", "1s", "--force",
                  "--passphrase-file", right)  # fmt: skip
    assert rotated.exit_code == 0, rotated.stderr
    new_key = places.sealed / "keys" / "root-2.key"
    assert new_key.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert new_key.stat().st_mode & 0o777 == 0o600
    assert _signing_generation(places.sealed, PASSPHRASE.encode()) == 2  # signs once active


def _signing_generation(state: Path, passphrase: bytes) -> int:
    later = Clock(datetime.now(UTC) + timedelta(minutes=1))
    authority = Authority.open(state, passphrase=passphrase, clock=later)
    try:
        return authority.signer()[0]
    finally:
        authority.close()


def test_a_plaintext_root_key_on_an_encrypted_authority_is_refused(places: Places) -> None:
    """A key written unprotected (by hand, or by an older version) is not signed with."""
    from meshid.svid import generate_key, key_to_pem

    s, right = str(places.sealed), str(places.tmp / "right")
    assert run("ca", "rotate", "--state", s, "--propagation", "1s", "--force",
               "--passphrase-file", right).exit_code == 0  # fmt: skip
    (places.sealed / "keys" / "root-2.key").write_bytes(key_to_pem(generate_key()))
    assert _signing_generation(places.sealed, PASSPHRASE.encode()) == 1  # root 1 keeps signing
    status = run("ca", "status", "--state", s)
    assert "WARNING root 2 cannot activate: root key root-2.key is not encrypted" in status.stdout
    # and a key file of an active root that lost its protection is not signed with
    authority = Authority.open(places.sealed, passphrase=PASSPHRASE.encode(), clock=system_clock())
    try:
        with pytest.raises(StateError, match="is not encrypted") as caught:
            authority._load_key(places.sealed / "keys" / "root-2.key")
        assert caught.value.reason == "key_unprotected"
    finally:
        authority.close()


def test_a_broken_root_key_does_not_stop_actions_that_do_not_sign(places: Places) -> None:
    _garbage_key(places)
    s = str(places.state)
    assert run("ca", "token", "--state", s, "web").exit_code == 0
    assert run("policy", "allow", "web", "api", "--state", s).exit_code == 0
    assert run("ca", "bundle", "--state", s).exit_code == 0


def test_policy_commands(state: Path) -> None:
    s = str(state)
    allowed = run("policy", "allow", "web", "ns/prod/sa/api", "--state", s)
    assert allowed.exit_code == 0
    assert "policy version 1" in allowed.stdout
    listed = run("policy", "list", "--state", s)
    assert listed.stdout == "spiffe://example.org/web -> spiffe://example.org/ns/prod/sa/api\n"
    check = run("policy", "check", "web", "ns/prod/sa/api", "--state", s)
    assert (check.exit_code, check.stdout.count("\n")) == (0, 1)
    assert check.stdout.startswith("allowed: ")
    reverse = run("policy", "check", "ns/prod/sa/api", "web", "--state", s)
    assert (reverse.exit_code, reverse.stdout.count("\n")) == (1, 1)
    assert reverse.stdout.startswith("denied: ")
    assert "policy version 1" in reverse.stdout
    denied = run("policy", "deny", "web", "ns/prod/sa/api", "--state", s)
    assert denied.exit_code == 0
    assert "policy version 2" in denied.stdout


def test_init_output(tmp_path: Path) -> None:
    result = run("ca", "init", "--state", str(tmp_path / "s"), "--trust-domain", "example.org",
                 "--svid-ttl", "30s")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "spiffe://example.org" in result.stdout
    assert "SVID lifetime 30s" in result.stdout
