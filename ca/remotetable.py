"""Which authority commands run through the control plane (`--server`), and which cannot.

One table for both ends: the client (`ca.remote`) reads it to know which
arguments name files it must send by value, the control plane
(`ca.adminapi`) to refuse anything else. A command runs remotely exactly as
it runs locally (the authority runs the same command line against its own
state directory), so its output is the same either way.

Arguments that would make the authority read or write a path of its own
host are never taken from the wire: `--state` (the authority names its own),
`--passphrase-file`, and a command's own path options unless sent by value
(`files`) or refused with a reason (`refused`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from meshid.errors import InvalidInput
from meshid.reasons import Reason


@dataclass(frozen=True, slots=True)
class RemoteSpec:
    files: tuple[str, ...] = ()  # options whose value is a file the client sends by value
    refused: Mapping[str, str] = field(default_factory=dict)  # option -> why it cannot travel


_PLAIN = RemoteSpec()

REMOTE: Mapping[tuple[str, ...], RemoteSpec] = {
    ("policy", "allow"): _PLAIN,
    ("policy", "deny"): _PLAIN,
    ("policy", "list"): _PLAIN,
    ("policy", "check"): _PLAIN,
    ("policy", "apply"): RemoteSpec(files=("-f", "--file")),
    ("policy", "export"): _PLAIN,
    ("ca", "revoke"): _PLAIN,
    ("ca", "unrevoke"): _PLAIN,
    ("ca", "token"): _PLAIN,  # `ca token ID`: a new join token
    ("ca", "token", "list"): _PLAIN,
    ("ca", "token", "delete"): _PLAIN,
    ("ca", "svid", "list"): _PLAIN,
    ("ca", "status"): _PLAIN,
    # it changes only the database (the instance's rows and its roots' ends), as
    # `ca revoke` does; the removed instance's own state directory is not touched
    ("ca", "instance", "remove"): _PLAIN,
    ("ca", "bundle"): _PLAIN,
    ("ca", "operator", "add"): _PLAIN,
    ("ca", "operator", "remove"): _PLAIN,
    ("ca", "operator", "list"): _PLAIN,
    ("ca", "attestor", "add"): RemoteSpec(
        refused={
            "--jwks": "--jwks names a file the authority re-reads on its own host; "
            "use --jwks-url, or add the attestor on the authority's host"
        }
    ),
    ("ca", "attestor", "list"): _PLAIN,
    ("ca", "attestor", "remove"): _PLAIN,
    ("ca", "audit", "verify"): _PLAIN,
    ("ca", "audit", "export"): _PLAIN,
    ("federation", "add"): RemoteSpec(files=("--bundle",)),
    ("federation", "list"): _PLAIN,
    ("federation", "remove"): _PLAIN,
    ("federation", "refresh"): _PLAIN,
    ("service", "add"): _PLAIN,
    ("service", "remove"): _PLAIN,
    ("service", "list"): _PLAIN,
}

# Commands that take --state but act on the authority's host itself; each refuses
# --server with this reason.
LOCAL_ONLY: Mapping[tuple[str, ...], str] = {
    ("ca", "init"): "it creates the authority's state directory, on the authority's host",
    ("ca", "serve"): "it is the control plane; run it on the authority's host",
    ("ca", "rotate"): "it writes a new root key, under the root key's passphrase, "
    "on the authority's host",
    ("ca", "join"): "it creates this host's instance and its root key in a state directory, "
    "on the authority's host",
    ("ca", "issue"): "it signs with the root key and writes a private key on the authority's "
    "host; use a join token (`meshid ca token ID --server …`) instead",
}

NEVER = ("--state", "--server", "--svid", "--passphrase-file")  # never taken from the wire


def names_option(arg: str, option: str) -> bool:
    """`arg` gives `option` (`--opt`, `--opt=V`, or `-oV` for a one-letter option)."""
    if arg == option or arg.startswith(option + "="):
        return True
    return len(option) == 2 and not arg.startswith("--") and arg.startswith(option)


def check_call(command: tuple[str, ...], args: tuple[str, ...], sent: frozenset[int]) -> RemoteSpec:
    """The spec of `command` if it may run remotely with `args`; else `InvalidInput`.

    `sent` are the indexes of `args` whose file the client sent by value:
    each must follow one of the spec's file options, given as a word of its own.
    """
    spec = REMOTE.get(command)
    if spec is None:
        raise _refused(f"'{' '.join(command)[:64]}' does not run through the control plane")
    taken: set[int] = set()
    for i, arg in enumerate(args):
        if i in taken:
            continue
        if arg == "--":
            raise _refused("'--' is not taken remotely")
        for option in NEVER:
            if names_option(arg, option):
                raise _refused(f"{option} is not taken remotely")
        for option, why in spec.refused.items():
            if names_option(arg, option):
                raise _refused(why)
        for option in spec.files:
            if arg == option:
                if i + 1 not in sent:
                    raise _refused(f"{option}: the file must be sent by value")
                taken.add(i + 1)
            elif names_option(arg, option):
                raise _refused(f"{option}: give the file as a separate argument")
    if sent - taken:
        raise _refused("a file was sent for an argument that takes none")
    return spec


def _refused(message: str) -> InvalidInput:
    return InvalidInput(message, reason=Reason.REMOTE_CALL_REFUSED)
