"""`meshid doctor --config FILE`: what can keep a sidecar from starting or serving.

Read-only: the config parses; the files it names are readable, the private
key 0600; in authority mode the state directory is a directory of ours,
0700 and writable; and the SVID on disk, if any, is not expired or close
to it. In authority mode, one TLS request to the health endpoint of each
server `authority.server` names, verified against the configured bundle
and the authority's SPIFFE ID exactly as the sidecar does, judged by
`sidecar.failures`.
"""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import trio
from cryptography import x509

from meshid.doctor import Check
from meshid.errors import MeshIdError
from meshid.wire import HEALTH
from sidecar.config import Address, AuthoritySource, SidecarConfig, load_config
from sidecar.control import ControlClient, ControlPlaneError
from sidecar.statedir import KEY_FILE, SVID_FILE

EXPIRY_SHARE = 0.25  # fail when less than this share of the SVID lifetime is left


def check_config(path: Path, now: datetime | None = None, timeout: float = 5.0) -> list[Check]:
    try:
        config = load_config(path)
    except MeshIdError as exc:
        return [Check("config", False, exc.message, "fix the key the message names")]
    checks = [Check("config", True, f"{path} loads; identity {config.identity}")]
    checks += _files(config)
    checks.append(_svid_expiry(config, now or datetime.now(UTC)))
    if isinstance(config.source, AuthoritySource):
        checks += _reachable(config, config.source, timeout)
    return checks


def _reachable(config: SidecarConfig, source: AuthoritySource, timeout: float) -> list[Check]:
    """Each server of `authority.server` on its own: `authority`, or `authority[i]` of several.

    The sidecar serves while any one answers, but an operator wants to know
    which of them would not if it had to fail over.
    """
    try:
        bundle_pem = source.bundle.read_bytes()
    except OSError as exc:
        return [
            Check("authority", False, f"{source.bundle}: {exc.strerror}", "fix [authority] bundle")
        ]
    several = len(source.servers) > 1
    return [
        _probe(
            f"authority[{i}]" if several else "authority",
            address,
            ControlClient(address.host, address.port, config.trust_domain, timeout=timeout),
            bundle_pem,
        )
        for i, address in enumerate(source.servers)
    ]


def _probe(name: str, address: Address, client: ControlClient, bundle_pem: bytes) -> Check:
    """One unauthenticated GET /healthz over TLS: reachable, speaking TLS, with the right ID."""

    async def probe() -> None:
        await client.request("GET", HEALTH, None, bundle_pem=bundle_pem, now=datetime.now(UTC))

    try:
        trio.run(probe)
    except ControlPlaneError as exc:
        if exc.status:  # it answered over verified TLS: reachable, even if unhealthy
            return Check(name, True, f"{address} answers as {client.expected} ({exc.status})")
        return Check(name, False, exc.message, exc.brief)
    return Check(name, True, f"{address} answers over TLS as {client.expected}")


def _readable(path: Path, *, private: bool) -> str | None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        with path.open("rb"):
            pass
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if private and mode & 0o077:
        return f"{path} is {mode:o}, not 0600"
    return None


def _files(config: SidecarConfig) -> list[Check]:
    source = config.source
    problems: list[str] = []
    if isinstance(source, AuthoritySource):
        # The join token is needed only until the first enrollment has left a key.
        enrolled = (source.state_dir / KEY_FILE).exists()
        needed = [source.bundle] if enrolled else [source.bundle, source.token_file]
        for file in needed:
            if file is not None and (problem := _readable(file, private=False)):
                problems.append(problem)
        state = source.state_dir
        if not state.exists():
            state_check = Check("state_dir", True, f"{state} will be created at first start")
        elif not state.is_dir():
            state_check = Check("state_dir", False, f"{state} is not a directory", "fix state_dir")
        else:
            mode = stat.S_IMODE(state.stat().st_mode)
            if not os.access(state, os.W_OK | os.X_OK):
                state_check = Check(
                    "state_dir", False, f"{state} is not writable", "run as its owner"
                )
            elif mode & 0o077:
                state_check = Check(
                    "state_dir", False, f"{state} is {mode:o}, not 0700", f"chmod 0700 {state}"
                )
            else:
                state_check = Check("state_dir", True, f"{state} is writable, 0700")
            key = state / KEY_FILE
            if key.exists() and (problem := _readable(key, private=True)):
                problems.append(problem)
        files = (
            Check("files", True, "every file named is readable, keys 0600")
            if not problems
            else Check("files", False, "; ".join(problems), "fix the path or the mode (keys 0600)")
        )
        return [files, state_check]
    for file, private in ((source.cert, False), (source.key, True), (source.bundle, False)):
        if problem := _readable(file, private=private):
            problems.append(problem)
    if source.policy is not None and (problem := _readable(source.policy, private=False)):
        problems.append(problem)
    if problems:
        return [Check("files", False, "; ".join(problems), "fix the path or the mode (keys 0600)")]
    return [Check("files", True, "every file named is readable, keys 0600")]


def _svid_expiry(config: SidecarConfig, now: datetime) -> Check:
    source = config.source
    cert = source.state_dir / SVID_FILE if isinstance(source, AuthoritySource) else source.cert
    try:
        leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    except FileNotFoundError:
        return Check("svid_expiry", True, "no SVID yet: the sidecar enrolls at first start")
    except (OSError, ValueError, IndexError):
        return Check("svid_expiry", False, f"{cert} holds no certificate", "re-issue the SVID")
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now >= end:
        return Check(
            "svid_expiry",
            False,
            f"the SVID expired at {end:%Y-%m-%dT%H:%M:%SZ}",
            "renew or re-issue it",
        )
    if end - now < (end - start) * EXPIRY_SHARE:
        return Check(
            "svid_expiry",
            False,
            f"the SVID expires at {end:%Y-%m-%dT%H:%M:%SZ}",
            "is renewal failing? see the log",
        )
    return Check("svid_expiry", True, f"the SVID expires at {end:%Y-%m-%dT%H:%M:%SZ}")
