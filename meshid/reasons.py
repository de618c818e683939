"""Every stable reason meshid can emit: one list for logs, metrics, HTTP errors and the docs.

A reason is a snake_case string that names why something happened: why a
connection was allowed or refused (`decision` lines and
``meshid_connections_total{reason}``), why it closed, why an error was
raised (`MeshIdError.reason`), why the control plane refused a request (the
``error`` of its JSON body), why the sidecar or the authority logged a
failure. Operators alert on them, so a reason, once published, keeps its
name; `PUBLISHED` are those the README lists (its table is generated from
here: ``python tools/reasons_table.py``).

`Reason` is a `StrEnum`: a member *is* its string, so it goes wherever a
reason string went, and `tests/meshid/test_reasons.py` checks that every
reason written as a literal in the code is a member, and every member is
used.
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """A stable reason; `Reason.X.description` says what it means in one line."""

    description: str

    def __new__(cls, value: str, description: str = "") -> Reason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.description = description
        return member

    # -- connection decisions (the sidecar) --
    ALLOWED = "allowed", "the allow-list permits this pair of identities"
    NOT_ALLOWED = (
        "not_allowed",
        "the peer proved its identity but the allow-list does not list the pair",
    )
    IDENTITY_REVOKED = (
        "identity_revoked",
        "the identity (the peer's, or this sidecar's own) is revoked",
    )
    WRONG_IDENTITY = (
        "wrong_identity",
        "the upstream presented a valid SVID of another identity than the route names",
    )
    UNTRUSTED_TRUST_DOMAIN = (
        "untrusted_trust_domain",
        "the SPIFFE ID belongs to another trust domain",
    )
    UNTRUSTED_CERTIFICATE = (
        "untrusted_certificate",
        "the certificate does not chain to a root of the trust bundle",
    )
    NO_CLIENT_CERTIFICATE = "no_client_certificate", "the peer sent no certificate"
    INVALID_SVID = "invalid_svid", "the certificate breaks the X509-SVID profile"
    INVALID_CERTIFICATE = (
        "invalid_certificate",
        "the certificate could not be used at all (malformed, refused by OpenSSL)",
    )
    EXPIRED = "expired", "the certificate has expired"
    NOT_YET_VALID = "not_yet_valid", "the certificate is not valid yet"
    HANDSHAKE_TIMEOUT = "handshake_timeout", "the TLS handshake took too long"
    PLAINTEXT_HTTP = "plaintext_http", "the peer spoke plain HTTP to a TLS port"
    NOT_TLS = "not_tls", "the peer did not speak TLS"
    TLS_VERSION = "tls_version", "no TLS version or cipher in common (TLS 1.3 only)"
    REJECTED_BY_PEER = "rejected_by_peer", "the peer refused our certificate"
    CONNECTION_CLOSED = "connection_closed", "the peer closed the connection during the handshake"
    TLS_ERROR = "tls_error", "another TLS failure"
    UPSTREAM_UNREACHABLE = "upstream_unreachable", "the upstream sidecar could not be reached"
    APP_UNREACHABLE = "app_unreachable", "the local application could not be reached"
    UNKNOWN_DESTINATION = (
        "unknown_destination",
        "a captured connection went to an address no identity is known to serve",
    )
    CONNECTION_LIMIT = "connection_limit", "too many connections open at once"
    SOURCE_LIMIT = "source_limit", "too many connections open at once from one source"
    PEER_QUARANTINED = "peer_quarantined", "the peer failed too often and is refused for a while"
    INTERNAL_ERROR = (
        "internal_error",
        "a bug of ours; it cost one connection or request, not the process",
    )
    KEY_NOT_PROVED = (
        "key_not_proved",
        "the peer sent a certificate without proving it holds its key",
    )
    STORAGE_UNAVAILABLE = (
        "storage_unavailable",
        "state could not be written or reached for a reason of the host (disk full, "
        "read-only, the authority's database unreachable); retried",
    )
    UNUSABLE_CREDENTIALS = (
        "unusable_credentials",
        "this sidecar's own certificate and key cannot be used for TLS",
    )

    # -- connection closes (the sidecar) --
    CLOSED = "closed", "the connection ended normally"
    POLICY_REVOKED = "policy_revoked", "the allow-list no longer permits the pair"
    PEER_CERTIFICATE_EXPIRED = (
        "peer_certificate_expired",
        "the peer's certificate expired while connected",
    )
    IDLE_TIMEOUT = "idle_timeout", "no byte moved for longer than the idle limit"
    DRAIN_TIMEOUT = "drain_timeout", "the sidecar stopped and the connection outlived the drain"
    PEER_RESET = "peer_reset", "the peer reset or broke the connection"
    PEER_TRUNCATED = "peer_truncated", "the peer closed without a TLS close_notify"
    LOCAL_RESET = "local_reset", "the local side reset the connection"
    IO_ERROR = "io_error", "another I/O error on the connection"
    SHUTDOWN = "shutdown", "the sidecar's copy loop stopped while the connection was open"

    # -- errors of the shared kernel --
    ERROR = "error", "an error without a more precise reason"
    INVALID_INPUT = "invalid_input", "a value a human typed is malformed"
    INVALID_SPIFFE_ID = "invalid_spiffe_id", "not a SPIFFE ID or trust domain"
    INVALID_DURATION = "invalid_duration", "not a duration"
    INVALID_CONFIG = "invalid_config", "a config file is wrong; the message names the key"
    INVALID_BUNDLE = "invalid_bundle", "a trust bundle is malformed or empty"
    INVALID_CHAIN = "invalid_chain", "a certificate chain is malformed"
    INVALID_KEY = "invalid_key", "a private key is malformed"
    INVALID_PEM = "invalid_pem", "a PEM file holds no certificate"
    MALFORMED_CERTIFICATE = "malformed_certificate", "a certificate cannot be parsed"
    MULTIPLE_URI_SANS = "multiple_uri_sans", "an SVID names more than one URI"
    NO_SPIFFE_ID = "no_spiffe_id", "a certificate names no SPIFFE ID"
    NO_CERTIFICATE = "no_certificate", "a credentials file holds no certificate"
    BAD_KEY_USAGE = "bad_key_usage", "a certificate's key usage breaks the SVID profile"
    LEAF_IS_CA = "leaf_is_ca", "a leaf SVID is marked as a CA"
    KEY_MISMATCH = "key_mismatch", "the key does not match the certificate"
    PASSPHRASE_REQUIRED = "passphrase_required", "the key is encrypted and no passphrase was given"
    BAD_PASSPHRASE = "bad_passphrase", "the passphrase does not decrypt the key"
    UNSUPPORTED_KEY = "unsupported_key", "a key type or size the profile does not allow"

    # -- the authority --
    AUTHORITY_ERROR = "authority_error", "the authority refused or cannot proceed"
    STATE_ERROR = "state_error", "the state directory is missing, initialised already or unreadable"
    TOKEN_REJECTED = "token_rejected", "a join token or client certificate was refused"
    TOKEN_UNKNOWN = "token_unknown", "the join token is not known"
    TOKEN_USED = "token_used", "the join token was used already"
    TOKEN_EXPIRED = "token_expired", "the join token has expired"
    CSR_REJECTED = "csr_rejected", "a CSR that may not be signed"
    INVALID_CSR = "invalid_csr", "a CSR is malformed"
    CSR_TOO_LARGE = "csr_too_large", "a CSR is over the size limit"
    BAD_CSR_SIGNATURE = "bad_csr_signature", "a CSR's signature does not verify"
    CSR_IDENTITY_MISMATCH = (
        "csr_identity_mismatch",
        "a CSR asks for another identity than the caller's",
    )
    KEY_REUSED = "key_reused", "a CSR reuses the key of the SVID it renews"
    KEY_UNPROTECTED = (
        "key_unprotected",
        "a root key would be written without the required protection",
    )
    UNKNOWN_CERTIFICATE = "unknown_certificate", "a client certificate the authority never issued"
    RESERVED_ID = "reserved_id", "the SPIFFE ID is reserved for the authority itself"
    INVALID_DNS_NAME = "invalid_dns_name", "not a DNS name"
    INVALID_IP = "invalid_ip", "not an IP address"
    INVALID_ADDRESS = "invalid_address", "not a listen address"
    POLICY_ERROR = "policy_error", "an allow-list change that makes no sense"
    ALREADY_ALLOWED = "already_allowed", "the pair is on the allow-list already"
    UNKNOWN_PAIR = "unknown_pair", "the pair is not on the allow-list"
    NOT_OPERATOR = "not_operator", "the caller is not on the authority's operator list"
    REMOTE_CALL_REFUSED = (
        "remote_call_refused",
        "an operator's call names a command or an argument the control plane does not run",
    )
    REMOTE_CALL_TIMEOUT = (
        "remote_call_timeout",
        "a command an operator ran through the control plane took too long and was stopped",
    )
    REMOTE_CALL_BUSY = (
        "remote_call_busy",
        "the operator already has a command running through the control plane",
    )
    INVALID_OPERATOR_ID = (
        "invalid_operator_id",
        "an operator ID must be spiffe://TD/meshid/operator/NAME",
    )
    ALREADY_OPERATOR = "already_operator", "the identity is on the operator list already"
    UNKNOWN_OPERATOR = "unknown_operator", "the identity is not on the operator list"
    ALREADY_MAPPED = "already_mapped", "the address is mapped to that identity already"
    UNKNOWN_SERVICE = "unknown_service", "the address is not mapped to that identity"
    ROTATION_IN_PROGRESS = "rotation_in_progress", "a root rollover is in progress already"
    ROOT_PENDING = (
        "root_pending",
        "this instance's root is published but not yet held by every live sidecar: "
        "it signs nothing until then",
    )
    ROOT_EXPIRED = "root_expired", "the signing root has expired"
    ROOT_EXPIRING = "root_expiring", "the signing root expires soon"
    ROOT_EXPIRY = "root_expiry", "SVIDs are cut short to the signing root's expiry"
    SCHEMA_TOO_NEW = "schema_too_new", "the database was written by a newer version"
    AUDIT_BROKEN = "audit_broken", "the audit log's chain does not verify"
    AUDIT_KEY_MISSING = "audit_key_missing", "the audit log's key is missing"
    AUDIT_KEY_UNREADABLE = "audit_key_unreadable", "the audit log's key cannot be read"
    FILE_LIMIT_LOW = (
        "file_limit_low",
        "the open-file limit cannot be raised to what the limits need",
    )
    LISTEN_FAILED = "listen_failed", "a listener could not be bound"
    RESOURCE_EXHAUSTED = "resource_exhausted", "the process ran out of file descriptors or memory"
    INVALID_REPORT = "invalid_report", "a sidecar's status report is malformed"
    REPORT_TOO_LARGE = "report_too_large", "a sidecar's status report is over the size limit"

    # -- HTTP errors of the control plane --
    BAD_REQUEST = "bad_request", "not a well-formed HTTP request"
    BODY_TOO_LARGE = "body_too_large", "the request body is over the size limit"
    REQUEST_TIMEOUT = "request_timeout", "the request did not arrive in time"
    METHOD_NOT_ALLOWED = "method_not_allowed", "the endpoint does not take this method"
    NOT_FOUND = "not_found", "no such endpoint"
    NOT_IMPLEMENTED = "not_implemented", "an HTTP feature the control plane does not implement"
    RATE_LIMITED = "rate_limited", "too many failed enrollments from this source; retry later"
    RENEWAL_RATE_LIMITED = (
        "renewal_rate_limited",
        "this identity renewed more often than its renewal budget allows; retry later",
    )
    TOO_MANY_WATCHES = "too_many_watches", "too many long polls are parked; retry later"
    TOO_MANY_CONNECTIONS_FROM_SOURCE = (
        "too_many_connections_from_source",
        "too many connections without a client certificate from one source",
    )
    TOO_MANY_AUTHENTICATED_CONNECTIONS = (
        "too_many_authenticated_connections",
        "too many connections with a client certificate open at once",
    )
    ANONYMOUS_POOL_FULL = (
        "anonymous_pool_full",
        "the oldest connection without a client certificate was closed to make room",
    )
    INVALID_JSON = "invalid_json", "a message body is not the JSON this wire version reads"
    INVALID_QUERY = "invalid_query", "the watch query's versions are not integers"

    # -- the sidecar and its control plane --
    AUTHORITY_UNREACHABLE = (
        "authority_unreachable",
        "the control plane could not be reached or did not answer",
    )
    AUTHORITY_TLS = "authority_tls", "TLS with the control plane failed"
    AUTHORITY_IDENTITY = (
        "authority_identity",
        "the control plane is not spiffe://TD/meshid/authority",
    )
    AUTHORITY_PROTOCOL = (
        "authority_protocol",
        "the control plane answered something this version cannot read",
    )
    AUTHORITY_REFUSED = "authority_refused", "the control plane refused without saying why"
    AUTHORITY_UNAVAILABLE = (
        "authority_unavailable",
        "the control plane answered that it cannot serve now (HTTP 5xx, 408, 429): retried",
    )
    AUTHORITY_PLAIN_HTTP = (
        "authority_plain_http",
        "the authority's address answered plain HTTP, not TLS: check authority.server",
    )
    AUTHORITY_NOT_TLS = (
        "authority_not_tls",
        "the authority's address does not speak TLS 1.3: check authority.server",
    )
    AUTHORITY_UNTRUSTED = (
        "authority_untrusted",
        "the authority's certificate does not chain to authority.bundle: wrong bundle?",
    )
    NOT_AN_AUTHORITY = (
        "not_an_authority",
        "the server at the authority's address is not a meshid authority",
    )
    TRUST_DOMAIN_MISMATCH = (
        "trust_domain_mismatch",
        "the authority serves another trust domain than the sidecar's config names",
    )
    NO_CREDENTIALS = "no_credentials", "the sidecar has no SVID yet (enrolling)"
    STATE_IN_USE = "state_in_use", "another meshid ca serve is using this state directory"
    ADDRESS_IN_USE = "address_in_use", "another process listens on the address to serve"
    LOCAL_CREDENTIALS = (
        "local_credentials",
        "the credentials for the control plane cannot be loaded",
    )
    BAD_FEED = "bad_feed", "the feed names an identity of another trust domain"
    POLICY_DELTA_MISMATCH = (
        "policy_delta_mismatch",
        "a policy delta was cut from another version than the sidecar holds: it asks for the "
        "whole list",
    )
    MISSING_FILE = "missing_file", "a file the config names cannot be read"
    MISSING_TOKEN = "missing_token", "the join token file cannot be read"
    STATE_DIR = "state_dir", "the state directory cannot be used"
    UNREADABLE = "unreadable", "a file cannot be read"
    SVID_EXPIRED = "svid_expired", "this sidecar's own SVID expired and could not be renewed"

    # -- the Workload API (the sidecar) --
    WORKLOAD_API_CALLER_NOT_ADMITTED = (
        "workload_api_caller_not_admitted",
        "the caller's uid and gid (SO_PEERCRED) are not in allow_uids/allow_gids",
    )
    WORKLOAD_API_MISSING_HEADER = (
        "workload_api_missing_header",
        "the request lacks the workload.spiffe.io: true metadata",
    )
    WORKLOAD_API_BAD_REQUEST = (
        "workload_api_bad_request",
        "the request is not a well-formed Workload API call",
    )
    WORKLOAD_API_REQUEST_TOO_LARGE = (
        "workload_api_request_too_large",
        "the request message is larger than the limit",
    )
    WORKLOAD_API_DEADLINE = "workload_api_deadline", "the caller's grpc-timeout passed"
    WORKLOAD_API_PROTOCOL_ERROR = (
        "workload_api_protocol_error",
        "the caller broke HTTP/2 (a malformed frame); it got GOAWAY",
    )
    WORKLOAD_API_SLOW_READER = (
        "workload_api_slow_reader",
        "the caller did not read what it was sent in time; its connection was dropped",
    )
    WORKLOAD_API_TOO_MANY_CONNECTIONS = (
        "workload_api_too_many_connections",
        "the socket already serves its maximum of connections",
    )
    WORKLOAD_API_NO_IDENTITY = (
        "workload_api_no_identity",
        "the sidecar holds no SVID yet",
    )
    WORKLOAD_API_JWT_UNAVAILABLE = (
        "workload_api_jwt_unavailable",
        "this sidecar cannot mint or check JWT-SVIDs (static mode without JWT keys)",
    )

    WORKLOAD_API_CALL_FAILED = (
        "workload_api_call_failed",
        "a call to the Workload API failed (the command prints the server's status)",
    )

    # -- JWT-SVIDs --
    JWT_INVALID = "jwt_invalid", "the JWT-SVID is not valid"
    JWT_MALFORMED = "jwt_malformed", "the token is not a JWT-SVID (bad encoding, no sub or exp)"
    JWT_ALGORITHM = "jwt_algorithm", "the token's alg is not one the JWT-SVID specification allows"
    JWT_UNKNOWN_KEY = "jwt_unknown_key", "the token names no kid, or one the bundle lacks"
    JWT_SIGNATURE = "jwt_signature", "the token's signature does not verify"
    JWT_EXPIRED = "jwt_expired", "the token's exp has passed (or its nbf has not come)"
    JWT_AUDIENCE = "jwt_audience", "the audience asked for is not in the token's aud"

    # -- enrollment by platform identity (JWT attestors) --
    JWT_ISSUER = "jwt_issuer", "no attestor trusts the enrollment JWT's iss"
    JWT_CLAIM = "jwt_claim", "the enrollment JWT lacks a claim the attestor requires or maps"
    JWT_REPLAYED = "jwt_replayed", "the enrollment JWT was used already"
    JWKS_UNAVAILABLE = "jwks_unavailable", "the attestor's issuer keys cannot be read"

    # -- federation between trust domains --
    BUNDLE_ENDPOINT_UNREACHABLE = (
        "bundle_endpoint_unreachable",
        "a federated trust domain's bundle endpoint could not be read (the last good is kept)",
    )
    WRONG_ENDPOINT_ID = (
        "wrong_endpoint_id",
        "a bundle endpoint authenticated with another SPIFFE ID than the configured endpoint ID",
    )
    BUNDLE_SEQUENCE_BACKWARDS = (
        "bundle_sequence_backwards",
        "a fetched bundle's spiffe_sequence is below the one held: it is not taken",
    )


# The reasons the README lists: operators may alert on them, so they keep their names.
PUBLISHED: tuple[Reason, ...] = (
    Reason.ALLOWED,
    Reason.NOT_ALLOWED,
    Reason.IDENTITY_REVOKED,
    Reason.WRONG_IDENTITY,
    Reason.UNTRUSTED_TRUST_DOMAIN,
    Reason.UNTRUSTED_CERTIFICATE,
    Reason.NO_CLIENT_CERTIFICATE,
    Reason.INVALID_SVID,
    Reason.INVALID_CERTIFICATE,
    Reason.EXPIRED,
    Reason.NOT_YET_VALID,
    Reason.HANDSHAKE_TIMEOUT,
    Reason.PLAINTEXT_HTTP,
    Reason.NOT_TLS,
    Reason.TLS_VERSION,
    Reason.REJECTED_BY_PEER,
    Reason.CONNECTION_CLOSED,
    Reason.TLS_ERROR,
    Reason.UPSTREAM_UNREACHABLE,
    Reason.APP_UNREACHABLE,
    Reason.UNKNOWN_DESTINATION,
    Reason.CONNECTION_LIMIT,
    Reason.SOURCE_LIMIT,
    Reason.PEER_QUARANTINED,
    Reason.INTERNAL_ERROR,
    Reason.KEY_NOT_PROVED,
    Reason.STORAGE_UNAVAILABLE,
    Reason.ROOT_PENDING,
    Reason.UNUSABLE_CREDENTIALS,
    Reason.CLOSED,
    Reason.POLICY_REVOKED,
    Reason.PEER_CERTIFICATE_EXPIRED,
    Reason.IDLE_TIMEOUT,
    Reason.DRAIN_TIMEOUT,
    Reason.PEER_RESET,
    Reason.PEER_TRUNCATED,
    Reason.LOCAL_RESET,
)


def markdown_table(reasons: tuple[Reason, ...] = PUBLISHED) -> str:
    """The README's table of reasons, one row each, in the order given."""
    rows = ["| reason | what it means |", "|---|---|"]
    rows += [f"| `{r}` | {r.description} |" for r in reasons]
    return "\n".join(rows) + "\n"
