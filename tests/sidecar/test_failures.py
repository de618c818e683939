"""The control-plane failure classifier: transient faults retried, permanent ones named."""

from __future__ import annotations

import errno

import pytest

from sidecar import failures
from sidecar.failures import PERMANENT, TRANSIENT, Failure, classify

WHERE = "10.0.0.5:8443"

# (case, failure, kind, reason, words the operator's line must hold)
CASES: list[tuple[str, Failure, str, str, tuple[str, ...]]] = [
    (
        "refused",
        Failure(failures.CONNECT, WHERE, errno=errno.ECONNREFUSED, detail="Connection refused"),
        TRANSIENT,
        "authority_unreachable",
        ("unreachable", "connection refused"),
    ),
    (
        "host_unreachable",
        Failure(failures.CONNECT, WHERE, errno=errno.EHOSTUNREACH),
        TRANSIENT,
        "authority_unreachable",
        ("host unreachable",),
    ),
    (
        "dns_not_yet",
        Failure(failures.CONNECT, WHERE, errno=-2, detail="Name or service not known"),
        TRANSIENT,
        "authority_unreachable",
        ("Name or service not known",),
    ),
    (
        "reset_after_handshake",
        Failure(failures.CLOSED, WHERE, errno=errno.ECONNRESET),
        TRANSIENT,
        "authority_unreachable",
        ("connection reset",),
    ),
    ("timeout", Failure(failures.TIMEOUT, WHERE), TRANSIENT, "authority_unreachable", ("time",)),
    (
        "503",
        Failure(failures.HTTP, WHERE, status=503, reason="storage_unavailable", detail="disk"),
        TRANSIENT,
        "storage_unavailable",
        ("503",),
    ),
    (
        "502_from_a_proxy_without_json",
        Failure(failures.HTTP, WHERE, status=502),
        TRANSIENT,
        "authority_unavailable",
        ("502",),
    ),
    (
        "429",
        Failure(failures.HTTP, WHERE, status=429, reason="rate_limited"),
        TRANSIENT,
        "rate_limited",
        ("429",),
    ),
    (
        "truncated_response",
        Failure(failures.PROTOCOL, WHERE, detail="peer closed connection"),
        TRANSIENT,
        "authority_protocol",
        ("malformed",),
    ),
    (
        "unknown_tls_error",
        Failure(failures.TLS, WHERE, tls_reason="SOMETHING_ODD"),
        TRANSIENT,
        "authority_tls",
        ("TLS",),
    ),
    (
        "plain_http",
        Failure(failures.TLS, WHERE, tls_reason="WRONG_VERSION_NUMBER", first_bytes=b"HTTP/1.1 4"),
        PERMANENT,
        "authority_plain_http",
        (f"authority at {WHERE} answered plain HTTP, not TLS", "check authority.server"),
    ),
    (
        "not_tls",
        Failure(failures.TLS, WHERE, tls_reason="WRONG_VERSION_NUMBER", first_bytes=b"SSH-2.0"),
        PERMANENT,
        "authority_not_tls",
        ("does not speak TLS", "authority.server"),
    ),
    (
        "tls_1_2_only",
        Failure(failures.TLS, WHERE, tls_reason="TLSV1_ALERT_PROTOCOL_VERSION"),
        PERMANENT,
        "authority_not_tls",
        ("TLS 1.3", "authority.server"),
    ),
    (
        "wrong_bundle",
        Failure(
            failures.TLS,
            WHERE,
            tls_reason="CERTIFICATE_VERIFY_FAILED",
            trust="authority.bundle (bundle.pem)",
        ),
        PERMANENT,
        "authority_untrusted",
        ("does not chain to authority.bundle (bundle.pem)", "wrong bundle?"),
    ),
    (
        "other_trust_domain",
        Failure(
            failures.IDENTITY,
            WHERE,
            presented="spiffe://other.org/meshid/authority",
            presented_trust_domain="other.org",
            expected="spiffe://example.org/meshid/authority",
        ),
        PERMANENT,
        "trust_domain_mismatch",
        ("the authority's trust domain is other.org but this sidecar's is example.org",),
    ),
    (
        "same_trust_domain_other_id",
        Failure(
            failures.IDENTITY,
            WHERE,
            presented="spiffe://example.org/web",
            presented_trust_domain="example.org",
            expected="spiffe://example.org/meshid/authority",
        ),
        PERMANENT,
        "authority_identity",
        ("spiffe://example.org/web", "authority.server"),
    ),
    (
        "no_spiffe_id",
        Failure(failures.IDENTITY, WHERE, detail="no URI SAN"),
        PERMANENT,
        "not_an_authority",
        ("not a meshid authority",),
    ),
    (
        "404_without_json",
        Failure(failures.HTTP, WHERE, status=404),
        PERMANENT,
        "not_an_authority",
        ("HTTP 404", "not a meshid authority"),
    ),
    (
        "200_without_json",
        Failure(failures.HTTP, WHERE, status=200),
        PERMANENT,
        "not_an_authority",
        ("HTTP 200",),
    ),
    (
        "token_refused",
        Failure(
            failures.HTTP, WHERE, status=401, reason="token_rejected", detail="token already used"
        ),
        PERMANENT,
        "token_rejected",
        ("token already used",),
    ),
    (
        "revoked",
        Failure(failures.HTTP, WHERE, status=403, reason="identity_revoked", detail="revoked"),
        PERMANENT,
        "identity_revoked",
        ("revoked",),
    ),
    (
        "bad_local_bundle",
        Failure(failures.LOCAL, WHERE, detail="no certificate or crl found"),
        PERMANENT,
        "local_credentials",
        ("no certificate",),
    ),
]


@pytest.mark.parametrize(
    ("failure", "kind", "reason", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_classify(failure: Failure, kind: str, reason: str, words: tuple[str, ...]) -> None:
    verdict = classify(failure)
    assert (verdict.kind, verdict.reason) == (kind, reason)
    assert verdict.permanent is (kind == PERMANENT)
    for word in words:
        assert word in verdict.message, verdict.message
    assert "\n" not in verdict.message
    assert verdict.brief and "\n" not in verdict.brief


def test_no_openssl_jargon_in_permanent_messages() -> None:
    for _, failure, kind, _, _ in CASES:
        if kind == PERMANENT:
            message = classify(failure).message
            assert "WRONG_VERSION_NUMBER" not in message
            assert "VERIFY_FAILED" not in message


# Where another instance of the authority may answer: no answer of the authority's at this
# one. Not where it answered no (shared state: every instance says the same), nor for our
# own credentials.
STAYS = {"429", "token_refused", "revoked", "bad_local_bundle"}


@pytest.mark.parametrize(
    ("case", "failure"), [(c[0], c[1]) for c in CASES], ids=[c[0] for c in CASES]
)
def test_which_failures_move_to_another_server(case: str, failure: Failure) -> None:
    verdict = classify(failure)
    moves = failures.another_server_may_answer(failure.status, verdict.reason)
    assert moves is (case not in STAYS)
