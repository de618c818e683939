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
    ├── AuthorityError          the certificate authority refused or cannot proceed
    │   ├── StateError          state dir missing, already initialised, unreadable key …
    │   ├── TokenRejected       join token unknown, used or expired
    │   ├── IdentityRevoked
    │   ├── CsrRejected         a CSR that may not be signed
    │   ├── PolicyError         an allow-list change that makes no sense
    │   └── StorageUnavailable  the database or a state file cannot be written (disk full,
    │                           read-only filesystem): transient, retried, nothing half-written
    ├── PeerRejected            a connection's peer failed authentication or authorisation
    └── TlsFailure
"""

from __future__ import annotations


class MeshIdError(Exception):
    """Root of every error meshid raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason


class InvalidInput(MeshIdError):
    reason = "invalid_input"


class InvalidIdentity(InvalidInput):
    reason = "invalid_spiffe_id"


class InvalidDuration(InvalidInput):
    reason = "invalid_duration"


class ConfigError(MeshIdError):
    reason = "invalid_config"


class InvalidSvid(MeshIdError):
    reason = "invalid_svid"


class AuthorityError(MeshIdError):
    reason = "authority_error"


class StateError(AuthorityError):
    reason = "state_error"


class TokenRejected(AuthorityError):
    reason = "token_rejected"


class IdentityRevoked(AuthorityError):
    reason = "identity_revoked"


class CsrRejected(AuthorityError):
    reason = "csr_rejected"


class PolicyError(AuthorityError):
    reason = "policy_error"


class StorageUnavailable(AuthorityError):
    """A write to durable state failed for a reason of the host, not of the request.

    Disk full and read-only filesystems are faults an operator fixes while the
    process keeps running; callers log this, answer "try again later" and keep
    the state they had, rather than ending.
    """

    reason = "storage_unavailable"


class PeerRejected(MeshIdError):
    reason = "peer_rejected"


class TlsFailure(MeshIdError):
    reason = "tls_failure"
