"""Which database an authority's state directory uses, and how to reach it.

A state directory with no `database.json` keeps everything in SQLite
(`authority.db`, the embedded default). With one, it is an *instance* of a
trust domain whose shared state is in PostgreSQL: the file names the
instance and the libpq connection string, never a password. The password
comes from libpq's own `PGPASSWORD`/`PGPASSFILE`, or from the file named at
`ca init`/`ca join` with `--database-password-file` (its path is kept, not
its content, so rotating the password is rewriting that file).

Nothing here ever puts the URL's password, or the password file's content,
into an error: a URL that carries a password is refused with words that do
not echo it, and a URL that does not parse is refused without quoting it
(libpq's parse errors quote the string).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from meshid.errors import InvalidInput, StateError
from meshid.files import write_atomic

DATABASE_FILE = "database.json"
_INSTANCE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


@dataclass(frozen=True, slots=True)
class Database:
    """A PostgreSQL trust domain as one instance reaches it."""

    url: str
    instance: str
    password_file: Path | None = None

    def password(self) -> str | None:
        """The password from the named file (first line), or None: libpq finds its own."""
        if self.password_file is None:
            return None
        try:
            text = self.password_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            what = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise StateError(
                f"{self.password_file}: cannot read the database password: {what}"
            ) from None
        lines = text.splitlines()
        if not lines or not lines[0]:
            raise StateError(f"{self.password_file}: the database password file is empty")
        return lines[0]


def check_url(url: str) -> str:
    """A libpq connection string or postgresql:// URI, refused if it carries a password."""
    from psycopg.conninfo import conninfo_to_dict  # the driver only where a database is named

    try:
        params = conninfo_to_dict(url)
    except Exception:
        raise InvalidInput(
            "--database: not a libpq connection string or postgresql:// URI"
        ) from None
    if params.keys() & {"password", "sslpassword"}:  # libpq's two secrets
        raise InvalidInput(
            "--database: the URL carries a password; give it with --database-password-file, "
            "PGPASSWORD or PGPASSFILE instead (and change it: command lines are visible)"
        )
    return url


def check_instance(name: str) -> str:
    if not _INSTANCE_NAME.match(name):
        raise InvalidInput(
            f"--instance: {name[:64]!r} is not a name (lowercase letters, digits, '.', '_', '-')"
        )
    return name


def load(state_dir: Path) -> Database | None:
    """The database this state directory's instance uses; None for the embedded SQLite."""
    path = state_dir / DATABASE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        doc = json.loads(text)
        password_file = doc.get("password_file")
        return Database(
            url=str(doc["url"]),
            instance=str(doc["instance"]),
            password_file=Path(password_file) if password_file else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StateError(f"{path}: not a meshid database file; it is damaged") from None


def save(directory: Path, database: Database) -> None:
    doc = {
        "engine": "postgresql",
        "url": database.url,
        "instance": database.instance,
        "password_file": str(database.password_file) if database.password_file else None,
    }
    write_atomic(directory / DATABASE_FILE, json.dumps(doc, indent=2).encode() + b"\n", mode=0o600)
