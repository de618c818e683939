"""Management calls over the control plane's mTLS, by operators only.

The caller is authenticated like any sidecar (a current SVID of ours, not
revoked) and must then be on the authority's operator list; anyone else is
refused 403 `not_operator`, and the refusal is audited too: once per
caller per `REFUSAL_AUDIT_WINDOW` (per serving process), the row counting
as `suppressed` the refusals left out since the caller's last row. A
workload probing the management routes shows in the audit log within a
minute, and cannot write a row per call; every refusal is counted in
``meshid_ca_refusals_total{reason="not_operator"}``.

``POST /v1/admin/run`` (`authorise_run` here, then `ca.adminrun`) runs any
command of `ca.remotetable` for the operator: the call is audited as
`operator_call` with the operator, the command and its arguments once it is
admitted, before it runs (`audit_run`); a call refused (not in the table, or
the operator busy with another) is audited with `refused` and its reason
instead, and a run stopped at its time limit gets a second row with
`stopped`. Every change the command makes is audited in its own row with
`operator` as well. The older routes (`ADMIN_ROUTES`: policy and
revocation by ID) stay for older clients and are audited the same way.
"""

from __future__ import annotations

from collections.abc import Callable

from ca.api import ControlApi, Reply, Request, error_for
from ca.remotetable import check_call
from meshid.adminwire import MAX_PAGE, AdminAnswer, PolicyCall, RevokeCall, RunCall
from meshid.errors import AuthorityError, InvalidInput, MeshIdError, PolicyError
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId
from meshid.wire import ADMIN_POLICY, ADMIN_REVOKE, ADMIN_RUN, decode


class NotOperator(AuthorityError):
    reason = Reason.NOT_OPERATOR


def _operator(api: ControlApi, req: Request) -> SpiffeId:
    # An operator's lost laptop is revoked by its SVID's serial, the person kept: that
    # certificate acts for no one (`_caller` refuses it as it refuses a revoked identity).
    caller = api._caller(req)
    if not api.authority.is_operator(caller):
        left_out = api.refusals.admit(str(caller), api.monotonic())
        if left_out is not None:
            more = {"suppressed": left_out} if left_out else {}
            api.authority.audit_call(caller, req.path, refused=Reason.NOT_OPERATOR, **more)
        raise NotOperator(f"{caller} is not on this authority's operator list")
    return caller


def _answer(ok: bool, *lines: str) -> Reply:
    return Reply(200, AdminAnswer(ok, lines).to_json())


def admin_policy(api: ControlApi, req: Request) -> Reply:
    operator = _operator(api, req)
    call = PolicyCall.parse(decode(req.body, "policy call"))
    authority = api.authority
    if call.action == "list":
        if call.after is None:  # a listing is audited once, at its first page
            authority.audit_call(operator, req.path, what="list")
        limit = min(call.limit or MAX_PAGE, MAX_PAGE)
        rules, version, more = authority.rules_page(call.after, limit)
        lines = [f"{s} -> {t}" for s, t in rules]
        if more:  # an older CLI, which does not page, prints this last line too
            summary = f"# policy version {version}, {len(lines)} pair(s) shown, more after the last"
        else:
            summary = f"# policy version {version}, {len(lines)} pair(s)"
        return Reply(
            200, AdminAnswer(True, (*lines, summary), rules[-1] if more else None).to_json()
        )
    src, dst = authority.resolve(call.source), authority.resolve(call.target)
    if call.action == "check":
        authority.audit_call(operator, req.path, what="check", source=str(src), target=str(dst))
        decision = authority.check(src, dst)
        verdict = "allowed" if decision.allowed else "denied"
        return _answer(decision.allowed, f"{verdict}: {decision.explanation}")
    change: Callable[..., int] = authority.allow if call.action == "allow" else authority.deny
    try:
        version = change(src, dst, operator=operator)
    except PolicyError as exc:
        if exc.reason not in (Reason.ALREADY_ALLOWED, Reason.UNKNOWN_PAIR):
            raise
        authority.audit_call(
            operator, req.path, what=call.action, source=str(src), target=str(dst), noop=True
        )
        state = "already allowed" if call.action == "allow" else "not allowed"
        version = authority.versions()[0]
        return _answer(
            True, f"{src} -> {dst} was {state} (policy version {version}); nothing changed"
        )
    done = "allowed" if call.action == "allow" else "denied"
    return _answer(True, f"{done} {src} -> {dst} (policy version {version})")


def admin_revoke(api: ControlApi, req: Request) -> Reply:
    operator = _operator(api, req)
    call = RevokeCall.parse(decode(req.body, "revoke call"))
    sid = api.authority.resolve(call.spiffe_id)
    version = api.authority.revoke(sid, operator=operator)
    return _answer(True, f"revoked {sid} (revocation version {version})")


ADMIN_ROUTES: dict[tuple[str, str], Callable[[ControlApi, Request], Reply]] = {
    ("POST", ADMIN_POLICY): admin_policy,
    ("POST", ADMIN_REVOKE): admin_revoke,
}


def authorise_run(api: ControlApi, req: Request) -> tuple[SpiffeId, RunCall] | Reply:
    """An operator's run call, checked against `ca.remotetable`; or the refusal, audited.

    Not audited yet when it passes: the run may still be refused (the operator
    busy), so `ca.adminrun` writes its row, through `audit_run`, once admitted.
    """
    try:
        operator = _operator(api, req)
        call = RunCall.parse(decode(req.body, "run call"))
        try:
            check_call(call.command, call.args, frozenset(f.at for f in call.files))
        except InvalidInput as exc:
            audit_run(api, req, operator, call, refused=exc.reason, why=exc.message)
            raise
    except MeshIdError as exc:
        return error_for(exc)
    return operator, call


def audit_run(
    api: ControlApi, req: Request, operator: SpiffeId, call: RunCall, **outcome: object
) -> None:
    """The `operator_call` row of a run: admitted (no `outcome`: with its arguments),
    refused (`refused=REASON`) or stopped (`stopped=REASON`).

    Admitting checks the caller again (`_operator`: revoked, or off the operator
    list, while its call waited for a slot), and refuses it with the same error.
    """
    details: dict[str, object] = {"command": " ".join(call.command)[:128], **outcome}
    if not outcome:
        _operator(api, req)
        details["args"] = list(call.args)
    api.authority.audit_call(operator, ADMIN_RUN, **details)
