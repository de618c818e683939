"""Every `ca`/`policy`/`service`/`federation` command that takes --state also runs through
the control plane with --server/--svid: authorised by the operator list, audited with the
operator's ID, and printing what the same command prints locally.

One real `meshid ca serve` for the module; the client is the real CLI, in process.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from ca_helpers import TD, run, serving_process, wait_event

from ca.authority import Authority
from meshid.clock import system_clock

ALICE = f"spiffe://{TD.name}/meshid/operator/alice"
BOB = f"spiffe://{TD.name}/meshid/operator/bob"


class Mesh:
    def __init__(self, root: Path, listen: str) -> None:
        self.root = root
        self.state = root / "state"
        self.listen = listen
        self.alice = ("--server", listen, "--svid", str(root / "alice"))
        self.web = ("--server", listen, "--svid", str(root / "web"))
        self.local = ("--state", str(self.state))

    def audit(self) -> list[tuple[str, dict[str, object]]]:
        authority = Authority.open(self.state, clock=system_clock())
        try:
            return [(e.action, e.details) for e in authority.store.audit_entries()]
        finally:
            authority.close()

    def same(self, *args: str) -> str:
        """Run ARGS remotely as alice, then locally: the same exit, stdout and stderr."""
        remote = run(*args, *self.alice)
        local = run(*args, *self.local)
        assert remote.exit_code == local.exit_code, remote.output + local.output
        assert remote.stdout == local.stdout
        assert remote.stderr == local.stderr
        return remote.stdout


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = tmp_path_factory.mktemp("remote")
    state = root / "state"
    Authority.init(state, TD, clock=system_clock()).close()
    for who, out in ((ALICE, "alice"), ("/web", "web")):
        issued = run("ca", "issue", who, "--out", str(root / out), "--state", str(state))
        assert issued.exit_code == 0, issued.output
    assert run("ca", "operator", "add", ALICE, "--state", str(state)).exit_code == 0
    log = root / "serve.log"
    with serving_process(state, log) as proc:
        yield Mesh(root, str(wait_event(log, "serving", proc, 30)["listen"]))


@pytest.mark.slow  # each remote command is a child process of the authority: ~1s each
def test_reads_print_the_same_remotely_as_locally(mesh: Mesh) -> None:
    assert run("policy", "allow", "/web", "/api", *mesh.local).exit_code == 0
    assert run("service", "add", "/api", "10.0.0.1:80", *mesh.local).exit_code == 0
    assert run("ca", "token", "/db", *mesh.local).exit_code == 0
    listed = json.loads(mesh.same("policy", "list", "--json"))
    assert listed["pairs"] == [{"from": f"spiffe://{TD.name}/web", "to": f"spiffe://{TD.name}/api"}]
    mesh.same("policy", "list")
    mesh.same("policy", "check", "/web", "/api", "--json")
    mesh.same("policy", "check", "/api", "/web")  # exit 1 both ways
    assert "[[allow]]" in mesh.same("policy", "export")
    assert json.loads(mesh.same("ca", "token", "list", "--json"))["tokens"]
    assert json.loads(mesh.same("ca", "svid", "list", "--json"))["svids"]
    assert json.loads(mesh.same("service", "list", "--json"))["services"]
    assert json.loads(mesh.same("ca", "status", "--json"))["trust_domain"] == TD.name
    assert ALICE in mesh.same("ca", "operator", "list")
    assert json.loads(mesh.same("federation", "list", "--json")) == []
    assert "BEGIN CERTIFICATE" in mesh.same("ca", "bundle")
    mesh.same("ca", "attestor", "list", "--json")
    assert "intact" in mesh.same("ca", "audit", "verify")
    assert "would cut 0 live connection(s)" in mesh.same(
        "policy", "deny", "/web", "/api", "--dry-run"
    )
    mesh.same("federation", "remove", "b.example")  # an error: the same one line, exit 1
    mesh.same("federation", "refresh")
    mesh.same("ca", "attestor", "remove", "nobody")
    mesh.same(  # the keys are fetched from the authority's host, and fail there alike
        "ca", "attestor", "add", "k8s", "--issuer", "https://issuer.example",
        "--jwks-url", "https://127.0.0.1:1/jwks", "--audience", "meshid", "--template", "ns/{ns}",
    )  # fmt: skip
    mesh.same("ca", "audit", "export")  # the remote call's own row is in both
    # options before the subcommand of `ca token` (its ID is optional there)
    tokens = run("ca", "token", *mesh.alice, "list", "--json")
    assert tokens.exit_code == 0 and json.loads(tokens.stdout)["tokens"]
    # a usage error is the same usage error (click finds it before anything is sent)
    mesh.same("policy", "check", "/web")


@pytest.mark.slow
def test_changes_through_the_control_plane_are_audited_with_the_operator(mesh: Mesh) -> None:
    before = len(mesh.audit())
    policy = mesh.root / "policy.toml"
    policy.write_text(f'[[allow]]\nfrom = "spiffe://{TD.name}/web"\nto = "spiffe://{TD.name}/db"\n')
    dry = run("policy", "apply", "-f", str(policy), "--dry-run", *mesh.alice)
    assert dry.exit_code == 0, dry.output
    assert f"+ spiffe://{TD.name}/web -> spiffe://{TD.name}/db" in dry.stdout
    assert "dry run" in dry.stdout and str(policy) not in dry.stdout.replace(str(policy), "")
    applied = run("policy", "apply", "--file", str(policy), *mesh.alice)
    assert applied.exit_code == 0, applied.output
    assert f"applied {policy}:" in applied.stdout  # the path as the operator typed it
    token = run("ca", "token", "/cache", "--ttl", "5m", *mesh.alice)
    assert token.exit_code == 0 and token.stdout.strip()
    deleted = run("ca", "token", "delete", "/cache", *mesh.alice)
    assert deleted.stdout == f"deleted 1 unused token(s) of spiffe://{TD.name}/cache\n"
    assert run("ca", "revoke", "/cache", *mesh.alice).exit_code == 0
    unrevoked = run("ca", "unrevoke", "/cache", *mesh.alice)
    assert unrevoked.stdout.startswith(f"unrevoked spiffe://{TD.name}/cache")
    assert run("service", "add", "/db", "10.0.0.2:5432", *mesh.alice).exit_code == 0
    assert run("service", "remove", "/db", "10.0.0.2:5432", *mesh.alice).exit_code == 0
    assert run("ca", "operator", "add", BOB, *mesh.alice).exit_code == 0
    assert run("ca", "operator", "remove", BOB, *mesh.alice).exit_code == 0
    rows = mesh.audit()[before:]
    by_alice = [(a, d) for a, d in rows if d.get("operator") == ALICE]
    assert len(by_alice) == len(rows)  # nothing in between that does not name her
    calls = [d["command"] for a, d in by_alice if a == "operator_call"]
    assert calls == [
        "policy apply",
        "policy apply",
        "ca token",
        "ca token delete",
        "ca revoke",
        "ca unrevoke",
        "service add",
        "service remove",
        "ca operator add",
        "ca operator remove",
    ]
    changes = [a for a, _ in by_alice if a != "operator_call"]
    assert changes == [
        "policy_apply",
        "token",
        "token_delete",
        "revoke",
        "unrevoke",
        "service_add",
        "service_remove",
        "operator_add",
        "operator_remove",
    ]
    # the file travelled by value: its contents are not in the audit, its name is
    first = next(d for a, d in by_alice if a == "operator_call")
    assert str(policy) in json.dumps(first["args"]) and "[[allow]]" not in json.dumps(first)


def test_one_read_and_one_change_remotely(mesh: Mesh) -> None:
    """The fast twin of the two tests above: one command each way."""
    before = len(mesh.audit())
    allowed = run("policy", "allow", "/cron", "/api", *mesh.alice)
    assert allowed.exit_code == 0, allowed.output
    assert allowed.stdout.startswith(f"allowed spiffe://{TD.name}/cron -> ")
    assert "never been enrolled" in allowed.stderr  # the warning, on stderr as locally
    mesh.same("policy", "list", "--json")
    rows = mesh.audit()[before:]
    assert [(a, d["operator"]) for a, d in rows] == [
        ("operator_call", ALICE),
        ("policy_allow", ALICE),
        ("operator_call", ALICE),
    ]
    assert rows[0][1]["command"] == "policy allow"
    assert rows[0][1]["args"] == ["/cron", "/api"]


def test_a_non_operator_is_refused_and_audited(mesh: Mesh) -> None:
    before = len(mesh.audit())
    for args in (("policy", "export"), ("ca", "status"), ("ca", "operator", "add", BOB)):
        refused = run(*args, *mesh.web)
        assert refused.exit_code == 1, refused.output
        assert "403" in refused.stderr and "operator list" in refused.stderr
        assert refused.stderr.count("\n") == 1 and refused.stdout == ""
    rows = mesh.audit()[before:]
    # Each is refused, but a caller's refusals are audited once a minute: one row, not
    # three, so no workload can fill the audit log by calling the management routes.
    assert [(a, d["operator"], d["refused"]) for a, d in rows] == [
        ("operator_call", f"spiffe://{TD.name}/web", "not_operator")
    ]
    assert BOB not in run("ca", "operator", "list", *mesh.local).stdout


def test_an_operator_svid_revoked_by_serial_is_refused(mesh: Mesh) -> None:
    """An operator's lost laptop: its one SVID revoked by serial, the person kept. The
    control plane refuses that certificate as it refuses a revoked identity; the
    operator's other SVID still works."""
    from cryptography import x509

    lost = mesh.root / "alice-lost"
    issued = run("ca", "issue", ALICE, "--out", str(lost), *mesh.local)
    assert issued.exit_code == 0, issued.output
    serial = f"{x509.load_pem_x509_certificate((lost / 'svid.pem').read_bytes()).serial_number:x}"
    assert run("ca", "revoke", "--serial", serial, *mesh.local).exit_code == 0
    before = len(mesh.audit())
    refused = run("ca", "operator", "add", BOB, "--server", mesh.listen, "--svid", str(lost))
    assert refused.exit_code == 1, refused.output
    assert "revoked" in refused.stderr and refused.stderr.count("\n") == 1
    assert BOB not in run("ca", "operator", "list", *mesh.local).stdout
    assert [a for a, _ in mesh.audit()[before:]] == []  # nothing ran
    assert run("ca", "status", *mesh.alice).exit_code == 0


def test_commands_that_need_the_authority_host_refuse_server(mesh: Mesh) -> None:
    for args in (
        ("ca", "init", "--trust-domain", "x.org"),
        ("ca", "serve", "--listen", "127.0.0.1:0"),
        ("ca", "rotate"),
        ("ca", "issue", "/web", "--out", str(mesh.root / "x")),
        ("ca", "join", "--audit-key", str(mesh.root / "k"), "--database", "host=x"),
    ):
        refused = run(*args, *mesh.alice)
        assert refused.exit_code == 2, refused.output
        assert refused.stderr.count("\n") == 1 and "--server" in refused.stderr
        assert "authority" in refused.stderr  # names why: it needs the authority's host
    jwks = run(
        "ca", "attestor", "add", "k8s", "--issuer", "https://i", "--jwks", "/etc/passwd",
        "--audience", "a", "--template", "x/{sub}", *mesh.alice,
    )  # fmt: skip
    assert jwks.exit_code == 2 and "--jwks-url" in jwks.stderr


def test_the_server_runs_only_what_the_table_allows(mesh: Mesh, tmp_path: Path) -> None:
    from ca.remote import Remote, RemoteRefused
    from meshid.adminwire import RunCall

    remote = Remote(*mesh.listen.rsplit(":", 1)[0:1], int(mesh.listen.rsplit(":", 1)[1]),
                    mesh.root / "alice")  # fmt: skip
    for call in (
        RunCall(("ca", "init"), ("--trust-domain", "x.org")),
        RunCall(("ca", "issue"), ("/web", "--out", str(tmp_path))),
        RunCall(("policy", "export"), ("--state", str(tmp_path))),
        RunCall(("policy", "export"), ("--state=/tmp",)),
        RunCall(("policy", "apply"), ("-f", "/etc/passwd")),
        RunCall(("policy", "apply"), ("--file=/etc/passwd",)),
        RunCall(("ca", "audit", "verify"), ("--", "--state", "/tmp")),
    ):
        with pytest.raises(RemoteRefused) as info:
            remote.run(call)
        assert info.value.reason == "remote_call_refused", call


# -- the runner itself, with a stand-in for the command line ----------------------


class Audited:
    """The rows the runner asks to audit (`ca.dispatch` writes them to the audit log)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, object]] = []

    async def __call__(self, **outcome: object) -> None:
        self.rows.append(outcome)


SHOW_FILE = (
    "import os, sys; a = sys.argv; p = a[a.index('-f') + 1]; "
    "print(p, oct(os.stat(p).st_mode & 0o777), open(p).read(), a[a.index('--state') + 1]); "
    "print('to stderr: ' + p, file=sys.stderr); sys.exit(3)"
)


async def test_the_runner_sends_files_privately_and_names_them_as_typed(tmp_path: Path) -> None:

    from ca.adminrun import RunSlots, run_for_operator
    from meshid.adminwire import RunAnswer, RunCall, RunFile
    from meshid.spiffeid import SpiffeId

    call = RunCall(("policy", "apply"), ("-f", "mine.toml"), (RunFile(1, b"CONTENT"),))
    reply = await run_for_operator(
        SpiffeId.parse(ALICE), call, tmp_path, RunSlots(1), entry=SHOW_FILE, audit=Audited()
    )
    assert reply.status == 200
    answer = RunAnswer.parse(reply.body)
    assert answer.exit_code == 3
    assert answer.stdout == f"mine.toml 0o600 CONTENT {tmp_path}\n".encode()
    assert answer.stderr == b"to stderr: mine.toml\n"


async def test_a_command_that_runs_too_long_is_stopped(tmp_path: Path) -> None:
    import trio

    from ca.adminrun import RunSlots, run_for_operator
    from meshid.adminwire import RunCall
    from meshid.spiffeid import SpiffeId

    hang = "import time; time.sleep(60)"
    audited = Audited()
    with trio.fail_after(20):
        reply = await run_for_operator(
            SpiffeId.parse(ALICE),
            RunCall(("ca", "status")),
            tmp_path,
            RunSlots(1),
            entry=hang,
            time_limit=0.5,
            audit=audited,
        )
    assert reply.status == 504 and reply.body["error"] == "remote_call_timeout"
    assert audited.rows == [{}, {"stopped": "remote_call_timeout"}]  # admitted, then stopped


SHOW_ENV = (
    "import json, os, sys; a = sys.argv; keys = a[a.index('--keys') + 1 :]; "
    "print(json.dumps({k: os.environ.get(k) for k in keys}))"
)


async def test_the_command_run_for_an_operator_gets_no_root_passphrase_and_no_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child needs no root key (the table has no signing command), and a traceback
    (MESHID_DEBUG) would hand the host's internals to a remote caller; the database
    password it needs (libpq's PGPASSWORD) and the rest of the environment stay."""
    import trio

    from ca.adminrun import RunSlots, run_for_operator
    from meshid.adminwire import RunAnswer, RunCall
    from meshid.spiffeid import SpiffeId

    monkeypatch.setenv("MESHID_CA_PASSPHRASE", "root-secret")
    monkeypatch.setenv("MESHID_DEBUG", "1")
    monkeypatch.setenv("MESHID_CA_STATE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("PGPASSWORD", "db-secret")
    keys = ("MESHID_CA_PASSPHRASE", "MESHID_DEBUG", "MESHID_CA_STATE", "PGPASSWORD")
    with trio.fail_after(20):
        reply = await run_for_operator(
            SpiffeId.parse(ALICE),
            RunCall(("ca", "status"), ("--keys", *keys)),
            tmp_path,
            RunSlots(1),
            entry=SHOW_ENV,
            audit=Audited(),
        )
    seen = json.loads(RunAnswer.parse(reply.body).stdout)
    assert seen == {
        "MESHID_CA_PASSPHRASE": None,
        "MESHID_DEBUG": None,
        "MESHID_CA_STATE": None,
        "PGPASSWORD": "db-secret",
    }


async def test_one_operator_cannot_take_every_run_slot(tmp_path: Path) -> None:
    """An operator running a slow command, then more, does not make the others wait:
    its second command at once is refused (429, a reason), another operator's runs."""
    import trio
    import trio.testing

    from ca.adminrun import MAX_RUNS, RunSlots, run_for_operator
    from meshid.adminwire import RunAnswer, RunCall
    from meshid.spiffeid import SpiffeId

    alice, bob = SpiffeId.parse(ALICE), SpiffeId.parse(BOB)
    slots = RunSlots(MAX_RUNS)
    status = RunCall(("ca", "status"))
    audited = Audited()
    run = functools.partial(run_for_operator, call=status, state_dir=tmp_path, slots=slots)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            slow = "import time; time.sleep(30)"  # until cancelled below
            nursery.start_soon(functools.partial(run, alice, entry=slow, audit=audited))
            await trio.testing.wait_all_tasks_blocked()
            again = await run(alice, entry="print('x')", audit=audited)
            assert again.status == 429 and again.body["error"] == "remote_call_busy"
            other = await run(bob, entry="print('bob')", audit=Audited())
            assert other.status == 200 and RunAnswer.parse(other.body).stdout == b"bob\n"
            nursery.cancel_scope.cancel()
        # once alice's first command has ended, she runs again
        done = await run(alice, entry="print('x')", audit=audited)
        assert done.status == 200
    assert audited.rows == [{}, {"refused": "remote_call_busy"}, {}]


async def test_a_last_option_without_its_value_cannot_swallow_the_state_directory(
    tmp_path: Path,
) -> None:
    """`ca revoke --serial` with no serial: the authority's own `--state` is not taken as
    the serial (and its directory as the ID); the command says the value is missing."""
    import trio

    from ca.adminrun import RunSlots, run_for_operator
    from meshid.adminwire import RunAnswer, RunCall
    from meshid.spiffeid import SpiffeId

    with trio.fail_after(30):
        reply = await run_for_operator(
            SpiffeId.parse(ALICE),
            RunCall(("ca", "revoke"), ("--serial",)),
            tmp_path,
            RunSlots(1),
            audit=Audited(),
        )
    answer = RunAnswer.parse(reply.body)
    assert answer.exit_code == 2, answer
    assert b"'--serial' requires an argument" in answer.stderr, answer


@pytest.mark.slow  # 64 MiB through a pipe, traced
async def test_a_command_that_prints_without_end_costs_the_authority_bounded_memory(
    tmp_path: Path,
) -> None:
    """What a command prints past the cap is read and dropped, not held: a huge
    `ca audit export` does not make the control plane hold all of it at once."""
    import tracemalloc

    import trio

    from ca.adminrun import RunSlots, run_for_operator
    from meshid.adminwire import MAX_OUTPUT, RunAnswer, RunCall
    from meshid.spiffeid import SpiffeId

    flood = "import sys; b = b'x' * (1 << 20); [sys.stdout.buffer.write(b) for _ in range(64)]"
    tracemalloc.start()
    try:
        with trio.fail_after(60):
            reply = await run_for_operator(
                SpiffeId.parse(ALICE), RunCall(("ca", "audit", "export")), tmp_path,
                RunSlots(1), entry=flood, audit=Audited(),
            )  # fmt: skip
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    answer = RunAnswer.parse(reply.body)
    assert answer.exit_code == 0 and answer.stdout == b"x" * MAX_OUTPUT
    assert b"cut the command's output" in answer.stderr
    assert peak < 48 * 1024 * 1024, peak  # the answer itself is ~3x the cap; 64 MiB were sent
