"""Management calls over the control plane's mTLS: policy and revocation, by operators only.

The caller is authenticated like any sidecar (a current SVID of ours, not
revoked) and must then be on the authority's operator list; anyone else is
refused 403 `not_operator`, and the refusal is audited too. Every call an
operator makes is audited with its ID: changes in their own audit row
(`policy_allow`, `policy_deny`, `revoke`, with `operator`), reads and
no-op changes as `operator_call`.
"""

from __future__ import annotations

from collections.abc import Callable

from ca.api import ControlApi, Reply, Request
from meshid.adminwire import MAX_PAGE, AdminAnswer, PolicyCall, RevokeCall
from meshid.errors import AuthorityError, PolicyError
from meshid.reasons import Reason
from meshid.spiffeid import SpiffeId
from meshid.wire import ADMIN_POLICY, ADMIN_REVOKE, decode


class NotOperator(AuthorityError):
    reason = Reason.NOT_OPERATOR


def _operator(api: ControlApi, req: Request) -> SpiffeId:
    caller = api._caller(req)
    if not api.authority.is_operator(caller):
        api.authority.audit_call(caller, req.path, refused=Reason.NOT_OPERATOR)
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
