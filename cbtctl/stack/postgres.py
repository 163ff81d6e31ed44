"""PostgreSQL 15 (Debian's binaries) on a data folder of the stack's own.

Layout under the state folder::

    postgres/data/     the cluster (initdb once; superuser ``postgres``, local socket trust,
                       TCP scram-sha-256)
    postgres/run/      the unix socket (never /var/run/postgresql: the system cluster's)
    logs/postgres.log  the server's stderr

PostgreSQL refuses to run as root, so as root the server, ``initdb`` and friends run as the
``postgres`` system user, which owns ``postgres/``. Otherwise they run as the current user. The
application role and database from ``settings.postgres`` are created (and the password set)
idempotently on every ``up``; the password goes to ``psql`` on stdin, never in ``argv``.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Mapping, Sequence

from cbtctl.stack import system
from cbtctl.stack.service import Service
from cbtctl.stack.system import PG_BIN, OsUser
from cbtstream.config import Settings

#: The cluster's superuser; reached over the unix socket with ``trust`` authentication only.
SUPERUSER = "postgres"


def quote_ident(name: str) -> str:
    """An SQL identifier, double-quoted (``"`` doubled)."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """An SQL string literal (``'`` doubled; standard_conforming_strings is on in PG 15)."""
    return "'" + value.replace("'", "''") + "'"


def bootstrap_sql(user: str, password: str, database: str) -> str:
    """psql script that creates (or updates) the application role and its database.

    Idempotent: the role is created only if missing, its password is (re)set every time, and the
    database is created only if missing (``CREATE DATABASE`` cannot run in a DO block, hence
    ``\\gexec``). Statement logging on error is switched off so a failure never writes the
    password into the server log.
    """
    role, name, db = quote_ident(user), quote_literal(user), quote_literal(database)
    return "\n".join([
        "SET log_min_error_statement = panic;",
        f"SELECT format('CREATE ROLE %I LOGIN', {name}) "
        f"WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {name})\\gexec",
        f"ALTER ROLE {role} LOGIN PASSWORD {quote_literal(password)};",
        f"SELECT format('CREATE DATABASE %I OWNER %I', {db}, {name}) "
        f"WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = {db})\\gexec",
        "",
    ])


class Postgres(Service):
    """The PostgreSQL server of the local stack."""

    name = "postgres"
    #: SIGINT is PostgreSQL's "fast" shutdown: roll back sessions and stop now (SIGTERM waits
    #: for every client to disconnect).
    stop_signal = signal.SIGINT

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.home = self.state_dir / "postgres"
        self.data = self.home / "data"
        self.socket_dir = self.home / "run"
        self.port = settings.stack.postgres_port
        self.host = settings.stack.host

    def run_as(self) -> OsUser | None:
        return OsUser.lookup(system.POSTGRES_OS_USER) if system.is_root() else None

    def ports(self) -> list[int]:
        return [self.port]

    def endpoint(self) -> str:
        pg = self.settings.postgres
        return f"postgresql://{pg.user}@{self.host}:{self.port}/{pg.database}"

    def install(self) -> None:
        system.ensure_tools((system.POSTGRES, system.PSQL))
        self.home.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        user = self.run_as()
        if user is not None:
            system.make_traversable(self.home)
            system.chown_tree(self.home, user)
        if (self.data / "PG_VERSION").is_file():
            return
        system.run(
            [
                str(PG_BIN / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                "--auth-local=trust", "--auth-host=scram-sha-256",
                "--encoding=UTF8", "--no-locale",
            ],
            cwd=self.home,
            user=user,
            timeout=300,
        )

    def command(self) -> tuple[Sequence[str], Mapping[str, str] | None]:
        # Settings go on the command line so a changed port applies without editing the data
        # folder's postgresql.conf.
        argv = [
            str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
            "-c", f"listen_addresses={self.host}",
            "-c", f"unix_socket_directories={self.socket_dir}",
            "-c", "logging_collector=off",
        ]
        return argv, None

    def probe(self) -> bool:
        """True when the server accepts connections on its TCP port (``pg_isready``)."""
        try:
            proc = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port),
                 "-t", "2"],
                capture_output=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return proc.returncode == 0

    def after_ready(self) -> None:
        """Create the application role and database (idempotent)."""
        pg = self.settings.postgres
        system.run(
            [
                str(PG_BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                "-h", str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER,
                "-d", "postgres",
            ],
            input_text=bootstrap_sql(pg.user, pg.password.get_secret_value(), pg.database),
            timeout=60,
        )
