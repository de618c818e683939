"""The error tree.

Every error carries a stable snake_case ``reason`` (the same string shows up in
decision logs and metric labels) and a message fit for an operator: one line,
never a secret.

    MeshIdError
    ├── InvalidInput            a value a human typed is malformed
    │   ├── InvalidIdentity     not a SPIFFE ID / trust domain, or the wrong trust domain
    │   └── InvalidDuration
    ├── ConfigError             a config file is wrong; the message names the key
    ├── InvalidSvid             a certificate breaks the X509-SVID profile or does not chain
    └── AuthorityError          the certificate authority refused or cannot proceed
        ├── StateError          state dir missing, already initialised, unreadable key …
        ├── TokenRejected       join token unknown, used or expired
        ├── IdentityRevoked
        ├── CsrRejected         a CSR that may not be signed
        ├── PolicyError         an allow-list change that makes no sense
        ├── RateLimited         a caller past its budget; `retry_after` says when to come back
        └── StorageUnavailable  the database or a state file cannot be written (disk full,
                                read-only filesystem): transient, retried, nothing half-written

Peers refused and TLS failures are not errors here: they are decisions, a
`Verdict` with a reason, logged and counted, never raised.
Every reason is a member of `meshid.reasons.Reason`.
"""

from __future__ import annotations

from meshid.reasons import Reason


class MeshIdError(Exception):
    """Root of every error meshid raises on purpose."""

    reason: str = Reason.ERROR

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason


class InvalidInput(MeshIdError):
    reason = Reason.INVALID_INPUT


class InvalidIdentity(InvalidInput):
    reason = Reason.INVALID_SPIFFE_ID


class InvalidDuration(InvalidInput):
    reason = Reason.INVALID_DURATION


class ConfigError(MeshIdError):
    reason = Reason.INVALID_CONFIG


class InvalidSvid(MeshIdError):
    reason = Reason.INVALID_SVID


class AuthorityError(MeshIdError):
    reason = Reason.AUTHORITY_ERROR


class StateError(AuthorityError):
    reason = Reason.STATE_ERROR


class TokenRejected(AuthorityError):
    reason = Reason.TOKEN_REJECTED


class IdentityRevoked(AuthorityError):
    reason = Reason.IDENTITY_REVOKED


class CsrRejected(AuthorityError):
    reason = Reason.CSR_REJECTED


class PolicyError(AuthorityError):
    reason = Reason.POLICY_ERROR


class RateLimited(AuthorityError):
    """A caller used up its budget (say, of renewals); it may come back in `retry_after` s."""

    reason = Reason.RENEWAL_RATE_LIMITED

    def __init__(self, message: str, *, retry_after: float, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after


class StorageUnavailable(AuthorityError):
    """A write to durable state failed for a reason of the host, not of the request.

    Disk full and read-only filesystems are faults an operator fixes while the
    process keeps running; callers log this, answer "try again later" and keep
    the state they had, rather than ending.
    """

    reason = Reason.STORAGE_UNAVAILABLE
