"""`meshid doctor --state DIR`: what can be wrong with an authority, checked from its state.

Each check reads only; none changes the state directory. The sidecars'
side is judged from the reports they sent: bundle agreement, SVID expiry,
and who went silent, and each sidecar's clock against ours (measured when
its report arrived, see `meshid.skew`).
"""

from __future__ import annotations

import stat
from datetime import datetime
from pathlib import Path

from ca.authority import Authority
from ca.rootlife import warning_text
from ca.status import WARN_SHARE
from ca.values import REPORT_FRESH, SidecarReport, printable
from meshid.clock import Clock
from meshid.doctor import Check
from meshid.errors import MeshIdError
from meshid.skew import SKEW_LIMIT, format_skew, too_skewed

SECRET_DIRS = ("keys", "jwt")  # every file in these holds key material
SECRET_FILES = ("audit.key",)


def check_state(state: Path, clock: Clock) -> list[Check]:
    checks = [_modes(state)]
    try:
        authority = Authority.open(state, clock=clock)
    except MeshIdError as exc:
        checks.append(Check("authority", False, exc.message, "is --state the right directory?"))
        return checks
    try:
        checks.append(Check("authority", True, f"trust domain {authority.trust_domain.name}"))
        checks += _authority_checks(authority)
    finally:
        authority.close()
    return checks


def _modes(state: Path) -> Check:
    """Key files 0600 (no group or other bits), directories 0700."""
    wrong: list[str] = []
    if not state.is_dir():
        return Check("file_modes", False, f"{state} is not a directory", "check --state")
    dirs = [state, *(state / d for d in SECRET_DIRS if (state / d).is_dir())]
    for directory in dirs:
        mode = stat.S_IMODE(directory.stat().st_mode)
        if mode & 0o077:
            wrong.append(f"{directory} is {mode:o}")
    files = [state / f for f in SECRET_FILES if (state / f).exists()]
    files += [f for d in dirs[1:] for f in d.iterdir() if f.is_file()]
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            wrong.append(f"{path} is {mode:o}")
    if wrong:
        return Check(
            "file_modes", False, "; ".join(wrong), "chmod 0600 key files and 0700 directories"
        )
    return Check("file_modes", True, "key files 0600, directories 0700")


def _authority_checks(authority: Authority) -> list[Check]:
    now = authority.clock_now()
    checks: list[Check] = []
    count, problem = authority.store.verify_audit()
    checks.append(
        Check("audit_chain", True, f"{count} entries verify")
        if problem is None
        else Check("audit_chain", False, printable(problem), "see `meshid ca audit verify`")
    )
    active, pending = authority.root_lifecycle()
    warning = warning_text(now, active, pending)
    checks.append(
        Check("root_expiry", True, f"root {active.generation} expires {active.not_after:%Y-%m-%d}")
        if warning is None
        else Check("root_expiry", False, printable(warning), "run `meshid ca rotate`")
    )
    _, _, sequence = authority.versions()
    reports, skipped = authority.reports()
    silent, lagging, expiring = [], [], []
    for entry in reports:
        who = f"{printable(str(entry.spiffe_id))} [{printable(entry.instance)}]"
        if now - entry.seen > REPORT_FRESH:
            silent.append(f"{who} ({int((now - entry.seen).total_seconds())}s)")
            continue
        if entry.report.bundle_sequence < sequence:
            lagging.append(f"{who} holds {entry.report.bundle_sequence}")
        not_after = entry.report.svid_not_after
        if not_after is not None and not_after - now < authority.svid_ttl * WARN_SHARE:
            expiring.append(f"{who} expires {not_after:%Y-%m-%dT%H:%M:%SZ}")
    checks.append(
        _listed(
            "sidecars_heard",
            silent,
            "sidecars not heard from lately",
            "are they running and able to reach the authority?",
            f"every sidecar reported in the last {int(REPORT_FRESH.total_seconds())}s",
        )
    )
    checks.append(
        _listed(
            "bundle_agreement",
            lagging,
            f"behind bundle {sequence}",
            "check the sidecars' feed (their logs)",
            f"every reporting sidecar holds bundle {sequence}",
        )
    )
    checks.append(
        _listed(
            "svid_expiry",
            expiring,
            "SVIDs close to expiry",
            "is renewal failing? see the sidecar's log",
            "no reported SVID is close to expiry",
        )
    )
    checks.append(_clock_skew(reports, now))
    if skipped:
        checks.append(
            Check("reports", False, printable("; ".join(skipped)), "a malformed report was skipped")
        )
    policy = authority.policy()
    unknown = sorted(
        {str(sid) for pair in policy.pairs for sid in pair if not authority.ever_known(sid)}
    )
    checks.append(
        _listed(
            "policy_identities",
            unknown,
            "named by policy but never enrolled or issued",
            "a typo? see `meshid policy list`",
            "every identity the policy names was enrolled or issued",
        )
    )
    return checks


def _clock_skew(reports: list[SidecarReport], now: datetime) -> Check:
    """Every fresh report with a clock reading, judged against `SKEW_LIMIT`."""
    limit = int(SKEW_LIMIT.total_seconds())
    measured = [e for e in reports if e.skew is not None and now - e.seen <= REPORT_FRESH]
    data = {
        "limit_seconds": limit,
        "sidecars": [
            {"spiffe_id": str(e.spiffe_id), "instance": e.instance, "skew_seconds": e.skew}
            for e in measured
        ],
    }
    off = [
        f"{printable(str(e.spiffe_id))} [{printable(e.instance)}] {format_skew(e.skew)}"
        for e in measured
        if e.skew is not None and too_skewed(e.skew)
    ]
    if off:
        return Check(
            "clock_skew",
            False,
            f"{len(off)} sidecar clock(s) more than {limit}s off the authority's: "
            + ", ".join(off),
            "sync those hosts' clocks (NTP); past the limit fresh SVIDs look not yet valid",
            data,
        )
    return Check(
        "clock_skew",
        True,
        f"every sidecar clock reported is within {limit}s of the authority's "
        f"({len(measured)} reading(s))",
        data=data,
    )


def _listed(name: str, items: list[str], what: str, hint: str, fine: str) -> Check:
    if not items:
        return Check(name, True, fine)
    return Check(name, False, f"{len(items)} {what}: {', '.join(items)}", hint)
