"""A throwaway PostgreSQL server for the tests: one per pytest worker, a database per test.

`initdb` refuses to run as root, so under root the cluster belongs to the
`postgres` user (its directory too) and its commands run through `runuser`.
It listens on a Unix socket in its own directory only (`listen_addresses=''`),
so no port is taken and two workers never meet. Durability is off: a test
cluster that dies loses nothing anyone needs.

One role, `meshid_pw`, must give a password (scram-sha-256), for the tests
that prove a password never shows; every other role is trusted on the socket.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

PASSWORD_ROLE = "meshid_pw"


def _bindir() -> Path:
    found = shutil.which("pg_config")
    if found is None:
        raise RuntimeError("pg_config is missing: run 'make system-packages' (Debian postgresql)")
    out = subprocess.run([found, "--bindir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


@dataclass
class PgCluster:
    root: Path
    owner: pwd.struct_passwd | None  # None: the tests' own user runs the server
    listen: str = ""  # TCP addresses to listen on too (listen_addresses); none by default
    netns: str | None = None  # the network namespace the server runs in (`ip netns exec`)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _run(self, *argv: str) -> None:
        prefix = ["runuser", "-u", self.owner.pw_name, "--"] if self.owner is not None else []
        if self.netns is not None:
            prefix = ["ip", "netns", "exec", self.netns, *prefix]
        subprocess.run([*prefix, *argv], check=True, capture_output=True, timeout=60)

    def admin_url(self, dbname: str = "postgres") -> str:
        user = self.owner.pw_name if self.owner is not None else pwd.getpwuid(os.getuid()).pw_name
        return f"host={self.root} dbname={dbname} user={user}"

    def url(self, dbname: str, *, user: str | None = None) -> str:
        base = self.admin_url(dbname)
        return base if user is None else base.rsplit(" user=", 1)[0] + f" user={user}"

    def create_database(self) -> str:
        name = f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
            conn.execute(f"GRANT ALL ON DATABASE {name} TO {PASSWORD_ROLE}")
            conn.execute(f"ALTER DATABASE {name} OWNER TO {PASSWORD_ROLE}")
        return name

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def set_password(self, password: str) -> None:
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(PASSWORD_ROLE), sql.Literal(password)
                )
            )

    def pg_ctl(self, *args: str) -> None:
        self._run(str(_bindir() / "pg_ctl"), "-D", str(self.data), *args)

    def start(self) -> None:
        """Start the server and wait until it accepts connections (again, after `stop`)."""
        options = (
            f"-c listen_addresses='{self.listen}' -c unix_socket_directories={self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self.pg_ctl("-w", "-t", "60", "-l", str(self.root / "log"), "-o", options, "start")

    def stop(self) -> None:
        """Stop the server at once, as a crash would: every client loses its connection."""
        self.pg_ctl("-m", "immediate", "-w", "stop")


@contextmanager
def running_cluster(*, listen: str = "", netns: str | None = None) -> Iterator[PgCluster]:
    """Start a cluster in a fresh directory; stop it (ours, by its data directory) and remove it.

    With `listen`, it takes TCP connections on those addresses too (in network
    namespace `netns`, if given), where every role must give a password.
    """
    bindir = _bindir()
    owner = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="mpg-"))  # short: a socket path has ~100 bytes
    cluster = PgCluster(root, owner, listen, netns)
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    os.chmod(root, 0o755)
    started = False
    try:
        cluster._run(
            str(bindir / "initdb"),
            "-D",
            str(cluster.data),
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
            "--auth-local=trust",
        )
        (cluster.data / "pg_hba.conf").write_text(
            f"local all {PASSWORD_ROLE} scram-sha-256\nlocal all all trust\n"
            "host all all all scram-sha-256\n"
        )
        cluster.start()
        started = True
        with psycopg.connect(cluster.admin_url(), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD NULL")
        yield cluster
    finally:
        if started:
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
