"""A throwaway PostgreSQL server in a temporary directory, for tests, benchmarks and trying
``gaikan serve --db`` on one machine (the server binaries of the Debian package ``postgresql``).

    with TempPostgres() as pg:
        url = pg.create_database("gaikan")     # postgresql://gaikan@127.0.0.1:PORT/gaikan
        ...

``initdb`` + ``pg_ctl start`` in a fresh directory under the system temp dir, listening on 127.0.0.1
only (trust authentication: local and throwaway), stopped and removed on exit. PostgreSQL refuses to
run as root, so under root the server runs as the ``postgres`` user (created by the Debian package)
or else ``nobody``. Not for production: a real deployment uses its own PostgreSQL server.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from gaikan.errors import GaikanError

SEARCH_DIRS = ("/usr/lib/postgresql/*/bin",)  # Debian keeps the server binaries off PATH


def find_server_bin() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl`` (PATH first, then the newest Debian version)."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    candidates = []
    for pattern in SEARCH_DIRS:
        for d in Path("/").glob(pattern.lstrip("/")):
            if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
                m = re.search(r"/(\d+)(?:\.(\d+))?/bin$", str(d))
                candidates.append(((int(m.group(1)), int(m.group(2) or 0)) if m else (0, 0), d))
    return max(candidates)[1] if candidates else None


def missing_reason() -> str | None:
    """Why a TempPostgres cannot start here (None: it can)."""
    if find_server_bin() is None:
        return ("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin: "
                "install the Debian package postgresql (make pg-deps)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed: pip install -e '.[postgres]'"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TempPostgres:
    """A PostgreSQL server for the lifetime of this object (``with`` or start()/stop())."""

    USER = "gaikan"  # the database superuser created by initdb

    def __init__(self, port: int | None = None, settings: dict[str, str] | None = None):
        self.port = port or _free_port()
        self.settings = {"listen_addresses": "127.0.0.1", "max_connections": "100", **(settings or {})}
        self.dir: Path | None = None
        self._run_as: tuple[int, int] | None = None

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str, timeout: float = 120) -> None:
        kwargs = {}
        if self._run_as is not None:
            kwargs = {"user": self._run_as[0], "group": self._run_as[1], "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir), "LC_ALL": "C", "LANG": "C"}
        proc = subprocess.run(args, cwd=self.dir, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
        if proc.returncode != 0:
            log = self.dir / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
            raise GaikanError(f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
                              + (f"\nserver log: {tail}" if tail else ""))

    def start(self) -> "TempPostgres":
        reason = missing_reason()
        if reason:
            raise GaikanError(reason)
        bindir = find_server_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="gaikan-pg-"))
        if os.geteuid() == 0:  # postgres will not run as root
            for name in ("postgres", "nobody"):
                try:
                    entry = pwd.getpwnam(name)
                except KeyError:
                    continue
                self._run_as = (entry.pw_uid, entry.pw_gid)
                break
            else:
                raise GaikanError("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")
            os.chown(self.dir, *self._run_as)
        self._bindir = bindir
        try:
            self._run(str(bindir / "initdb"), "-D", str(self.data_dir), "-U", self.USER, "--auth=trust",
                      "--encoding=UTF8", "--no-locale", "--no-sync")
            options = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
            self.pg_ctl("start", "-o", f"-p {self.port} -k {self.dir} {options}")
        except BaseException:
            self.stop()
            raise
        return self

    def pg_ctl(self, action: str, *args: str) -> None:
        """``pg_ctl ACTION`` on this server, waiting for it (e.g. ``pg_ctl("restart", "-m", "fast")``)."""
        # -l: the server's output goes to the log file, never to our pipes (which it would hold open)
        self._run(str(self._bindir / "pg_ctl"), action, "-D", str(self.data_dir), "-l", str(self.dir / "server.log"),
                  "-w", "-t", "120", *args, timeout=180)

    def create_database(self, name: str) -> str:
        """CREATE DATABASE name; returns its URL."""
        import psycopg

        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"database name {name!r}: use lower-case letters, digits and _")
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.dir is None:
            return
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self.pg_ctl("stop", "-m", "immediate")  # throwaway: no shutdown checkpoint
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "TempPostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
