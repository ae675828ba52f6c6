"""A throwaway Postgres server for the tests that run Dagster's instance on Postgres as well as SQLite.

Debian's `postgresql` (installed by `.ci/run`; its programs live in /usr/lib/postgresql/<version>/bin)
gets a cluster of its own in a temp folder (`initdb`, trust authentication), listens on a unix socket
in that folder and on a free loopback port, and serves the whole test session; each test gets a
database of its own (`new_database`), so its instance starts empty as a SQLite one does. Postgres
refuses to run as root: as root (CI, this sandbox) the server runs as the `postgres` user the package
creates (or `nobody`). It is stopped when the session ends, and dies with the test process if that is
killed. Where the programs are missing the tests skip saying how to install them, except in CI
(CI=true), where they fail: a missing install must show.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import psycopg2
import pytest

SUPERUSER = "postgres"
# SQLAlchemy 2.1 (what dagster's `sqlalchemy<3` resolves to) makes psycopg 3 the driver of a bare
# `postgresql://`; dagster-postgres installs psycopg2, so the URL names it (as deploy/dagster.k8s.yaml does).
SCHEME = "postgresql+psycopg2"
# The instance storages the operations tests run on, each in turn: Dagster's SQLite files, and Postgres
# (marked `postgres`: `pytest -m "not postgres"` leaves those runs out).
STORAGES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
INSTALL = "apt-get install -y postgresql (Debian; .ci/run does it in CI)"
_PR_SET_PDEATHSIG = 1


def binaries() -> Path | None:
    """The folder holding `initdb` and `postgres`: on PATH, else Debian's newest version."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres"):
        return Path(found).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name), reverse=True
    )
    return versions[0].parent if versions else None


def _server_user() -> str | None:
    """Who the server runs as: None (this user) unless this is root, which Postgres refuses."""
    if os.geteuid() != 0:
        return None
    for name in (SUPERUSER, "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root, and neither a 'postgres' nor a 'nobody' user to run Postgres as")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's process, before it starts: SIGINT (Postgres's fast shutdown) when the test process dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGINT)


@dataclass
class PostgresServer:
    root: Path
    port: int
    process: subprocess.Popen
    host: str = "127.0.0.1"
    _names: Iterator[int] = field(default_factory=itertools.count)
    _template: str | None = None

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str) -> str:
        return f"{SCHEME}://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def dsn(self, database: str) -> str:
        """libpq's form of the URL, for psycopg2 itself."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def _create_database(self, name: str, template: str | None = None) -> None:
        con = psycopg2.connect(self.dsn("postgres"))
        try:
            con.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with con.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        finally:
            con.close()

    def new_database(self) -> str:
        """A new database holding Dagster's empty tables; its URL, as dagster.yaml's `storage: postgres:
        postgres_url` takes it. Copied from a template Dagster filled once (0.3 s, where Dagster's own
        table creation and migrations take about 5 s per database)."""
        if self._template is None:
            self._template = "dagster_template"
            self._create_database(self._template)
            home = self.root / "template_home"
            home.mkdir()
            (home / "dagster.yaml").write_text(storage_yaml(self.url(self._template)))
            with dg.DagsterInstance.from_config(str(home)) as instance:
                instance.get_runs()  # the tables are created here
        name = f"dagster_{next(self._names)}"
        self._create_database(name, template=self._template)
        return self.url(name)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: clients disconnected, no wait for them
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def storage_config(url: str) -> dict:
    """The `storage:` value of a dagster.yaml (or dg.instance_for_test's overrides) for a database URL."""
    return {"postgres": {"postgres_url": url}}


def storage_yaml(url: str) -> str:
    """The `storage:` block of a dagster.yaml that keeps runs, event logs and schedules in `url`."""
    return f"storage:\n  postgres:\n    postgres_url: {url}\n"


def start(timeout_s: float = 60) -> PostgresServer:
    """initdb a cluster in a new temp folder and start its server; returns once it takes connections."""
    folder = binaries()
    if folder is None:
        message = f"the Postgres tests need Postgres's initdb and postgres programs: {INSTALL}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI: {message}", pytrace=False)
        pytest.skip(message)
    user = _server_user()
    # Not under pytest's own temp folder: that is private to root (0700) and the server may run as another user.
    # Short, too: the unix socket's path must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="clip-assets-pg-"))
    if user:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    data = root / "data"
    # Its own user and group only (not root's group, which the test process's files may belong to).
    as_user = {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []} if user else {}
    subprocess.run(
        [str(folder / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
         "--locale=C", "--no-sync"],
        check=True, capture_output=True, text=True, cwd=root, **as_user,
    )  # fmt: skip
    port = _free_port()
    with open(root / "server.log", "w") as log:
        if user:
            os.chown(log.name, pwd.getpwnam(user).pw_uid, -1)
        process = subprocess.Popen(
            [
                str(folder / "postgres"), "-D", str(data), "-p", str(port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={root}",
                # A throwaway server: nothing is kept through a power cut, so nothing waits for the disk.
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                "-c", "max_connections=200",
            ],
            stdout=log, stderr=subprocess.STDOUT, cwd=root, **as_user,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (one ctypes call before exec, nothing that takes a lock)
        )  # fmt: skip
    server = PostgresServer(root=root, port=port, process=process)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            psycopg2.connect(server.dsn("postgres"), connect_timeout=2).close()
            return server
        except psycopg2.OperationalError as exc:
            if process.poll() is not None or time.monotonic() > deadline:
                log_text = server.log_path.read_text()[-3000:]
                server.stop()
                raise RuntimeError(f"Postgres did not start ({exc}):\n{log_text}") from exc
            time.sleep(0.1)
