"""What a sidecar without an SVID enrolls with: a join token, or a platform-issued JWT.

`authority.token_file` holds a one-time join token made by `meshid ca token`;
`authority.jwt_file` a JWT the platform issues and rotates (a Kubernetes
projected ServiceAccount token), read again before every attempt. Both are
secrets: never logged, never in an error.
"""

from __future__ import annotations

from pathlib import Path

from meshid.errors import ConfigError
from meshid.spiffeid import SpiffeId
from meshid.wire import EnrollRequest
from sidecar.config import AuthoritySource
from sidecar.control import ControlPlaneError

MAX_JWT_FILE = 16 * 1024  # a JWT larger than this is not one the authority would take


def read_credential(source: AuthoritySource, identity: SpiffeId, state_dir: Path) -> str:
    """The join token or JWT to enroll with; ConfigError saying what to do if there is none."""
    if source.jwt_file is not None:
        return read_jwt(source.jwt_file, state_dir)
    token_file = source.token_file
    advice = (
        f"create one with 'meshid ca token {identity}' on the authority, write it to "
        f"{token_file or 'the file named by authority.token_file'} and start again"
    )
    if token_file is None:
        raise ConfigError(f"no valid SVID in {state_dir} and no join token: {advice}")
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"no valid SVID in {state_dir} and the join token {token_file} is unreadable "
            f"({exc.strerror}): {advice}",
            reason="missing_token",
        ) from None
    if not token:
        raise ConfigError(f"join token file {token_file} is empty: {advice}")
    return token


def read_jwt(path: Path, state_dir: Path) -> str:
    """The platform's current token: read again on every attempt (the kubelet rotates it)."""
    advice = (
        "mount a token the platform issues for the authority's attestor there "
        "(Kubernetes: a projected serviceAccountToken volume with audience meshid)"
    )
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_JWT_FILE + 1)
    except OSError as exc:
        raise ConfigError(
            f"no valid SVID in {state_dir} and the enrollment JWT {path} is unreadable "
            f"({exc.strerror}): {advice}",
            reason="missing_token",
        ) from None
    token = raw[:MAX_JWT_FILE].decode("ascii", "replace").strip()
    if not token:
        raise ConfigError(f"enrollment JWT file {path} is empty: {advice}")
    return token


def enroll_request(source: AuthoritySource, token: str, csr: bytes) -> EnrollRequest:
    if source.jwt_file is not None:
        return EnrollRequest("", csr.decode(), jwt=token)
    return EnrollRequest(token, csr.decode())


def refusal(
    exc: ControlPlaneError, source: AuthoritySource, identity: SpiffeId
) -> ControlPlaneError:
    """The one line that ends a sidecar whose enrollment no retry can fix."""
    if source.jwt_file is not None:
        what = "enrollment JWT refused"
        fix = (
            "check the authority's attestor ('meshid ca attestor list') against the "
            f"token in {source.jwt_file} and the identity {identity}"
        )
    else:
        what = "join token refused"
        fix = (
            f"create a new token with 'meshid ca token {identity}', write it "
            f"to {source.token_file} and start again"
        )
    return ControlPlaneError(
        f"{what}: {exc.message}; {fix}", reason=exc.reason, status=exc.status, permanent=True
    )
