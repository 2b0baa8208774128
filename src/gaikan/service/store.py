"""The inspection service's storage: the log (one row per inspection, committed before the service
answers) and the images it refers to, stored on disk under their SHA-256.

Two log backends behind one interface, :class:`LogStore`, chosen by :func:`open_log` from a URL:

    (no --db)                        SQLite file DATA_DIR/inspections.sqlite3 (the embedded default)
    sqlite:///ABSOLUTE/PATH          that SQLite file
    postgresql://USER@HOST:PORT/DB   a PostgreSQL database, shared by any number of service replicas

Every query is written once, in :class:`LogStore`, with ``?`` parameters; a backend only supplies a
transaction (:meth:`LogStore._transaction`) and its column types. The schema is the list
:data:`MIGRATIONS` (one entry per schema version, applied in order, recorded in the table
``schema_version``); both backends run the same list, so they hold the same rows.

Changing the schema (a new column, a new table, a new query):

1. Append one entry to :data:`MIGRATIONS` (never edit a released one: logs in the field are at
   that version), written once for both backends with the type placeholders of
   :data:`COLUMN_TYPES`: ``{id}`` a new table's key, ``{ref}`` a column holding another table's id,
   ``{float}`` (also times: unix seconds), ``{int}`` (also booleans: 0/1), ``{text}``. A new column:
   ``ALTER TABLE inspections ADD COLUMN model_version {text}`` (nullable, or NOT NULL with a
   DEFAULT: SQLite needs one for existing rows). A new table: ``CREATE TABLE reviews (id {id},
   inspection_id {ref} NOT NULL REFERENCES inspections (id), ...)`` plus its indexes.
2. A new column of ``inspections``: add the field, with a default, at the end of
   :class:`Inspection` (its field order is the SELECT's column order); ``add`` fills defaults.
3. A new query: a method on :class:`LogStore` using ``with self._transaction() as run:`` and
   ``run(sql, args)`` with ``?`` parameters (no literal ``?`` inside the SQL text); portable SQL
   only. Where the dialects really differ, put the two fragments in a per-dialect dict next to
   COLUMN_TYPES and pick by ``self.dialect``, never an ``if`` per backend in the method. If the app
   calls it through :class:`InspectionStore`, add a one-line delegate there (or call
   ``store.log.method``).
4. The tests in tests/service/test_log_store.py run every backend (PostgreSQL on a temp server).

Layout of a data directory::

    DATA_DIR/inspections.sqlite3        the SQLite log (plus its -wal / -shm files while open)
    DATA_DIR/blobs/ab/abcdef....png     images, thumbnails, heat maps, overlays, named by their hash
    DATA_DIR/blobs/ab/abcdef....npy     anomaly maps (float16 .npy), from which the pictures are drawn
    DATA_DIR/tmp/                       uploads being decoded (random names; removed afterwards)

Durability: blobs are written (temporary name, then an atomic rename) before the row that names
them is inserted, and the row is committed (SQLite ``synchronous=FULL``; PostgreSQL's default
``synchronous_commit=on``) before the HTTP response is sent, so a client that got an answer finds
its inspection in the log even if the process is killed right after. Blob names are content hashes
and a rename is atomic, so several replicas may share one blob directory. Nothing a client sends
(file names included) becomes part of a path: blob names are hex digests and the extension comes
from a fixed table.

Errors: when the log cannot take or give a row now (SQLite locked by another process past
``BUSY_TIMEOUT_S``, disk full, I/O error; PostgreSQL down, restarted, out of connections) or a blob
cannot be written (full disk), the store raises :class:`LogUnavailable`; the service answers 503
with ``Retry-After`` (:mod:`gaikan.service.errors`). The row was not written, so no acknowledged
inspection is lost.

Schema version 2 (issue 9) adds, at the end of the row: ``model_name`` (the name the model is
served under), ``model_version``, ``drift`` (1 if the model's drift flag was raised when the
inspection was made, 0 if not, NULL without calibration scores) and ``map_sha256`` (the stored
anomaly map). The pictures (thumb / heatmap / overlay) may be drawn after the row was written, on
their first request: :meth:`LogStore.set_pictures` fills their columns once. Older logs are
upgraded in place by the migration (old rows get NULL there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from gaikan.errors import GaikanError

DB_NAME = "inspections.sqlite3"
#: how long a SQLite write waits for a lock held by another connection before LogUnavailable (a 503)
BUSY_TIMEOUT_S = 5.0
#: seconds a client is told to wait before retrying after LogUnavailable (the 503's Retry-After)
RETRY_AFTER_S = 2
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1  # the range of an id (SQLite INTEGER, PostgreSQL BIGINT)

#: blob extensions we write (the key is what the caller asks for; nothing else is accepted)
BLOB_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "bmp": ".bmp", "tiff": ".tif", "gif": ".gif",
                   "webp": ".webp", "bin": ".bin", "npy": ".npy"}
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".bmp": "image/bmp", ".tif": "image/tiff",
               ".gif": "image/gif", ".webp": "image/webp", ".bin": "application/octet-stream",
               ".npy": "application/octet-stream"}

# ---- the schema (both backends) --------------------------------------------------------------------
#: column types per backend; migrations write {id}, {ref}, {float}, {int}, {text} (REAL is 4 bytes
#: in PostgreSQL, so floats are DOUBLE PRECISION there: the same float64 as SQLite's REAL)
COLUMN_TYPES = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "ref": "INTEGER", "float": "REAL", "int": "INTEGER",
               "text": "TEXT"},
    "postgresql": {"id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "ref": "BIGINT",
                   "float": "DOUBLE PRECISION", "int": "INTEGER", "text": "TEXT"},
}

#: schema version N = MIGRATIONS[N - 1]: (description, statements). Append only (see "Changing the
#: schema" at the top of this module).
MIGRATIONS: list[tuple[str, list[str]]] = [
    ("inspection log", [
        """CREATE TABLE inspections (
            id              {id},
            created         {float} NOT NULL,          -- unix time (s)
            created_utc     {text}  NOT NULL,          -- ISO 8601, UTC
            part_id         {text},
            image_sha256    {text}  NOT NULL,
            image_ext       {text}  NOT NULL,
            image_width     {int}   NOT NULL,
            image_height    {int}   NOT NULL,
            thumb_sha256    {text},
            heatmap_sha256  {text},
            overlay_sha256  {text},
            score           {float} NOT NULL,
            verdict         {text}  NOT NULL CHECK (verdict IN ('OK', 'NG')),
            threshold       {float} NOT NULL,
            threshold_method {text} NOT NULL,
            p_value         {float},
            model_id        {text}  NOT NULL,
            model_checksum  {text}  NOT NULL,
            timing_ms       {float} NOT NULL
        )""",
        "CREATE INDEX inspections_verdict ON inspections (verdict, id)",
        "CREATE INDEX inspections_created ON inspections (created)",
    ]),
    ("served model name and version, drift flag, anomaly map (issue 9)", [
        "ALTER TABLE inspections ADD COLUMN model_name {text}",
        "ALTER TABLE inspections ADD COLUMN model_version {text}",
        "ALTER TABLE inspections ADD COLUMN drift {int}",
        "ALTER TABLE inspections ADD COLUMN map_sha256 {text}",
    ]),
    # operators' reviews of NG verdicts (append-only: a later review of the same inspection
    # supersedes the earlier one, which stays as history)
    ("reviews", [
        """CREATE TABLE reviews (
            id              {id},
            inspection_id   {ref}   NOT NULL REFERENCES inspections (id),
            created         {float} NOT NULL,          -- unix time (s)
            created_utc     {text}  NOT NULL,          -- ISO 8601, UTC
            reviewer        {text}  NOT NULL,          -- the API key's name
            label           {text}  NOT NULL CHECK (label IN ('false_alarm', 'defect')),
            defect_type     {text},                    -- set iff label = 'defect'
            CHECK ((label = 'defect') = (defect_type IS NOT NULL))
        )""",
        "CREATE INDEX reviews_inspection ON reviews (inspection_id, id)",
    ]),
]
SCHEMA_VERSION = len(MIGRATIONS)

_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version     {int}  PRIMARY KEY,
    description {text} NOT NULL,
    applied_utc {text} NOT NULL,
    gaikan      {text} NOT NULL
)"""


@dataclass
class Inspection:
    """One row of the log (field order = column order of the SELECTs)."""

    id: int
    created: float
    created_utc: str
    part_id: str | None
    image_sha256: str
    image_ext: str
    image_width: int
    image_height: int
    thumb_sha256: str | None
    heatmap_sha256: str | None
    overlay_sha256: str | None
    score: float
    verdict: str
    threshold: float
    threshold_method: str
    p_value: float | None
    model_id: str
    model_checksum: str
    timing_ms: float
    model_name: str | None = None  # schema version 2 (issue 9)
    model_version: str | None = None
    drift: int | None = None
    map_sha256: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


REVIEW_LABELS = ("false_alarm", "defect")


@dataclass
class Review:
    """One operator review of an inspection (who = the API key's name)."""

    id: int
    inspection_id: int
    created: float
    created_utc: str
    reviewer: str
    label: str
    defect_type: str | None

    def to_dict(self) -> dict:
        return asdict(self)


_COLUMNS = [f.name for f in dataclasses.fields(Inspection)]
_REVIEW_COLUMNS = [f.name for f in dataclasses.fields(Review)]
# the current review of inspection i: its latest one
_CURRENT_REVIEW = "reviews.id = (SELECT MAX(r2.id) FROM reviews r2 WHERE r2.inspection_id = {i}.id)"
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Inspection) if f.default is not dataclasses.MISSING}


class LogUnavailable(GaikanError):
    """The log's database cannot be reached or is busy (locked, down, out of connections, disk full) or
    a blob cannot be stored: retry after ``retry_after`` seconds (the service answers 503)."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after = int(retry_after)


@contextmanager
def _unavailable_says(what: str):
    """Append what it means for the request (e.g. "nothing was logged") to a LogUnavailable."""
    try:
        yield
    except LogUnavailable as exc:
        raise LogUnavailable(f"{exc}; {what}: retry later", exc.retry_after) from None


@contextmanager
def unavailable_on_errors(what: str):
    """OSError while storing files (a full disk, an I/O error) -> LogUnavailable naming the problem."""
    try:
        yield
    except OSError as exc:
        from gaikan.io.atomic import describe_os_error

        raise LogUnavailable(f"the service cannot store data ({describe_os_error(exc)}); {what}: "
                             "retry later") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _utc_iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


#: run(sql, args) -> rows: one statement inside the current transaction ('?' parameters)
Run = Callable[[str, Sequence], list]


class LogStore(ABC):
    """The inspection log. All queries live here; a backend gives :meth:`_transaction` and a dialect.

    Thread-safe; rows are committed when a method returns.
    """

    dialect: str  # a key of COLUMN_TYPES
    location: str  # where the log is, for messages (never a password)

    @abstractmethod
    def _transaction(self, *, exclusive: bool = False) -> Iterator[Run]:
        """A context manager: one transaction (committed at exit, rolled back on error) yielding
        ``run``. ``exclusive``: no other writer (in any process) until it ends (schema changes).
        Backend errors meaning "busy or unreachable" come out as :class:`LogUnavailable`."""

    @abstractmethod
    def close(self) -> None: ...

    # ---- schema ---------------------------------------------------------------------------------
    def _existing_version(self, run: Run) -> int | None:
        """Hook for a log made before the schema_version table existed (None: there is none)."""
        return None

    def _after_migration(self, run: Run, version: int) -> None:
        """Hook run in the migration transaction once the schema is at ``version``."""

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION (one exclusive transaction: concurrent replicas wait)."""
        from gaikan import __version__

        types = COLUMN_TYPES[self.dialect]
        with self._transaction(exclusive=True) as run:
            run(_VERSION_TABLE.format(**types), ())
            version = run("SELECT MAX(version) FROM schema_version", ())[0][0]
            legacy = version is None
            if legacy:
                version = self._existing_version(run) or 0
            if version > SCHEMA_VERSION:
                raise GaikanError(f"the inspection log {self.location} has schema version {version}; this gaikan "
                                  f"({__version__}) knows versions up to {SCHEMA_VERSION}: upgrade gaikan or use "
                                  "another log")
            if legacy:  # a log made before the schema_version table: record the versions it has
                for v in range(1, version + 1):
                    run("INSERT INTO schema_version VALUES (?, ?, ?, ?)",
                        (v, MIGRATIONS[v - 1][0], _utc_iso(time.time()), "before schema_version"))
            for v in range(version + 1, SCHEMA_VERSION + 1):
                description, statements = MIGRATIONS[v - 1]
                for statement in statements:
                    run(statement.format(**types), ())
                run("INSERT INTO schema_version VALUES (?, ?, ?, ?)",
                    (v, description, _utc_iso(time.time()), __version__))
            self._after_migration(run, SCHEMA_VERSION)

    def schema_version(self) -> int:
        with self._transaction() as run:
            return int(run("SELECT MAX(version) FROM schema_version", ())[0][0])

    # ---- rows -----------------------------------------------------------------------------------
    def add(self, **fields) -> Inspection:
        """Insert one inspection and commit it before returning (the caller answers the client after)."""
        fields.setdefault("created", time.time())
        fields.setdefault("created_utc", _utc_iso(fields["created"]))
        fields = {**_DEFAULTS, **fields}
        cols = [c for c in _COLUMNS if c != "id"]
        missing = [c for c in cols if c not in fields]
        if missing:
            raise ValueError(f"inspection fields missing: {missing}")
        unknown = sorted(set(fields) - set(cols))
        if unknown:
            raise ValueError(f"unknown inspection fields: {unknown}")
        values = [fields[c] for c in cols]
        with _unavailable_says("nothing was logged"), self._transaction() as run:
            row_id = run(f"INSERT INTO inspections ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) "
                         "RETURNING id", values)[0][0]
        return Inspection(id=int(row_id), **{c: fields[c] for c in cols})

    def get(self, inspection_id: int) -> Inspection | None:
        if not _INT_MIN <= int(inspection_id) <= _INT_MAX:  # no such row (and no overflow in the driver)
            return None
        with _unavailable_says("the log could not be read"), self._transaction() as run:
            rows = run(f"SELECT {', '.join(_COLUMNS)} FROM inspections WHERE id = ?", (int(inspection_id),))
        return Inspection(*rows[0]) if rows else None

    def query(self, *, verdict: str | None = None, since: float | None = None, until: float | None = None,
              limit: int = 50, offset: int = 0, ng_first: bool = False) -> tuple[list[Inspection], int]:
        """Newest first (NG before OK with ``ng_first``); returns (page, total matching)."""
        clause, args = _where(("verdict = ?", verdict), ("created >= ?", _float_or_none(since)),
                              ("created < ?", _float_or_none(until)))
        order = "(verdict = 'NG') DESC, id DESC" if ng_first else "id DESC"
        with _unavailable_says("the log could not be read"), self._transaction() as run:
            total = run(f"SELECT COUNT(*) FROM inspections {clause}", args)[0][0]
            rows = run(f"SELECT {', '.join(_COLUMNS)} FROM inspections {clause} ORDER BY {order} LIMIT ? OFFSET ?",
                       [*args, min(int(limit), _INT_MAX), min(int(offset), _INT_MAX)])
        return [Inspection(*r) for r in rows], int(total)

    def count(self) -> int:
        with _unavailable_says("the log could not be read"), self._transaction() as run:
            return int(run("SELECT COUNT(*) FROM inspections", ())[0][0])

    def set_pictures(self, inspection_id: int, **sha256s: str) -> Inspection | None:
        """Record pictures drawn after the row was written (``thumb=``, ``heatmap=``, ``overlay=``:
        blob digests, stored first). A column already set is kept (two requests drawing the same
        picture at once write the same digest); returns the updated row (None for an unknown id)."""
        cols = {"thumb": "thumb_sha256", "heatmap": "heatmap_sha256", "overlay": "overlay_sha256"}
        unknown = set(sha256s) - set(cols)
        if unknown:
            raise ValueError(f"unknown picture kinds {sorted(unknown)}; expected {sorted(cols)}")
        if sha256s:
            sets = ", ".join(f"{cols[k]} = COALESCE({cols[k]}, ?)" for k in sha256s)
            with _unavailable_says("the pictures were not recorded"), self._transaction() as run:
                run(f"UPDATE inspections SET {sets} WHERE id = ?", [*sha256s.values(), int(inspection_id)])
        return self.get(inspection_id)

    # ---- reviews --------------------------------------------------------------------------------
    def add_review(self, inspection_id: int, *, label: str, reviewer: str, defect_type: str | None = None,
                   created: float | None = None) -> Review:
        """Record a review of one inspection and commit it (a later review supersedes an earlier one)."""
        if label not in REVIEW_LABELS:
            raise ValueError(f"review label must be one of {REVIEW_LABELS}, not {label!r}")
        if (label == "defect") != (defect_type is not None):
            raise ValueError("a 'defect' review needs a defect_type; a 'false_alarm' review has none")
        created = time.time() if created is None else float(created)
        values = [int(inspection_id), created, _utc_iso(created), reviewer, label, defect_type]
        cols = _REVIEW_COLUMNS[1:]
        with _unavailable_says("the review was not recorded"), self._transaction() as run:
            row_id = run(f"INSERT INTO reviews ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)}) "
                         "RETURNING id", values)[0][0]
        return Review(int(row_id), *values)

    def current_reviews(self, inspection_ids) -> dict[int, Review]:
        """{inspection id: its latest review} for those of ``inspection_ids`` that have one."""
        ids = [int(i) for i in inspection_ids]
        if not ids:
            return {}
        with _unavailable_says("the log could not be read"), self._transaction() as run:
            rows = run(f"SELECT {', '.join(_REVIEW_COLUMNS)} FROM reviews WHERE inspection_id IN "
                       f"({', '.join('?' for _ in ids)}) ORDER BY id", ids)
        return {r.inspection_id: r for r in (Review(*row) for row in rows)}  # later ids overwrite

    def review_queue(self, *, limit: int = 50, offset: int = 0,
                     model_id: str | None = None) -> tuple[list[Inspection], int]:
        """NG inspections nobody has reviewed yet, newest first; returns (page, total in the queue)."""
        where = "verdict = 'NG' AND NOT EXISTS (SELECT 1 FROM reviews WHERE reviews.inspection_id = inspections.id)"
        args: list = []
        if model_id is not None:
            where += " AND model_id = ?"
            args.append(model_id)
        with _unavailable_says("the log could not be read"), self._transaction() as run:
            total = run(f"SELECT COUNT(*) FROM inspections WHERE {where}", args)[0][0]
            rows = run(f"SELECT {', '.join(_COLUMNS)} FROM inspections WHERE {where} "
                       "ORDER BY id DESC LIMIT ? OFFSET ?", [*args, int(limit), int(offset)])
        return [Inspection(*r) for r in rows], int(total)

    def recent_reviews(self, *, limit: int = 20) -> list[Review]:
        """The latest reviews (all of them, superseded ones included), newest first."""
        with _unavailable_says("the log could not be read"), self._transaction() as run:
            rows = run(f"SELECT {', '.join(_REVIEW_COLUMNS)} FROM reviews ORDER BY id DESC LIMIT ?", (int(limit),))
        return [Review(*r) for r in rows]

    def reviewed_window(self, *, since: float | None = None, until: float | None = None,
                        model_id: str | None = None, limit: int = 50_000) -> list[tuple]:
        """The newest ``limit`` inspections in [since, until) as tuples (id, created, score, verdict,
        threshold, p_value, current review label or None, its defect_type), newest first."""
        clause, args = _where(("inspections.created >= ?", _float_or_none(since)),
                              ("inspections.created < ?", _float_or_none(until)), ("inspections.model_id = ?", model_id))
        sql = ("SELECT inspections.id, inspections.created, inspections.score, inspections.verdict, "
               "inspections.threshold, inspections.p_value, reviews.label, reviews.defect_type "
               f"FROM inspections LEFT JOIN reviews ON {_CURRENT_REVIEW.format(i='inspections')} "
               f"{clause} ORDER BY inspections.id DESC LIMIT ?")
        with _unavailable_says("the log could not be read"), self._transaction() as run:
            return [tuple(r) for r in run(sql, [*args, int(limit)])]


def _float_or_none(value) -> float | None:
    return None if value is None else float(value)


def _where(*conditions: tuple[str, object]) -> tuple[str, list]:
    """``WHERE c1 AND c2 ...`` (or "") and its parameters, from the (condition, value) pairs whose
    value is not None."""
    used = [(sql, value) for sql, value in conditions if value is not None]
    return (f"WHERE {' AND '.join(sql for sql, _ in used)}" if used else ""), [value for _, value in used]


class SQLiteStore(LogStore):
    """The log in one SQLite file (WAL, synchronous=FULL); one connection behind a lock."""

    dialect = "sqlite"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.location = str(self.path)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                       timeout=BUSY_TIMEOUT_S)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except sqlite3.OperationalError as exc:
            raise LogUnavailable(f"cannot open the inspection log {self.path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise GaikanError(f"{self.path} is not a usable inspection log: {exc}") from None

    @contextmanager
    def _transaction(self, *, exclusive: bool = False) -> Iterator[Run]:
        def run(sql: str, args: Sequence) -> list:
            return self._db.execute(sql, args).fetchall()

        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE" if exclusive else "BEGIN")
            except sqlite3.OperationalError as exc:  # "database is locked" after BUSY_TIMEOUT_S
                raise LogUnavailable(f"the inspection log {self.path} is busy ({exc})") from None
            try:
                yield run
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    try:
                        self._db.execute("ROLLBACK")
                    except sqlite3.Error:  # e.g. the disk is full: the transaction is dropped anyway
                        pass
                # locked past the busy timeout, disk full, I/O error; integrity and programming errors
                # (bugs) pass through
                if isinstance(exc, sqlite3.DatabaseError) and not isinstance(
                        exc, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)):
                    raise LogUnavailable(f"the inspection log {self.path} is unavailable "
                                         f"({' '.join(str(exc).split())})") from None
                raise

    def _existing_version(self, run: Run) -> int | None:
        # logs written before the schema_version table (gaikan 0.1) carry their version in user_version
        legacy = run("PRAGMA user_version", ())[0][0]
        has_table = run("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'inspections'", ())[0][0]
        return int(legacy) if legacy and has_table else None

    def _after_migration(self, run: Run, version: int) -> None:
        run(f"PRAGMA user_version = {int(version)}", ())  # older gaikans refuse a log they do not know

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresStore(LogStore):
    """The log in a PostgreSQL database (psycopg 3, a small connection pool per process).

    Any number of service processes may share one database: ids come from an identity column, each
    insert commits on its own, and schema migrations hold an advisory lock so replicas starting
    together apply each migration once.
    """

    dialect = "postgresql"
    #: pg_advisory_xact_lock key for schema changes (any constant; "gaikan" in ASCII)
    MIGRATION_LOCK = 0x67616B616E

    def __init__(self, url: str, *, pool_size: int = 4, timeout: float = 10.0):
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise GaikanError("a postgresql:// log needs psycopg: pip install 'gaikan[postgres]'") from None
        self._psycopg = psycopg
        self.location = redact_url(url)
        try:  # one direct connection first: its error says why (refused, no such database, auth)
            psycopg.connect(url, connect_timeout=max(1, int(timeout))).close()
        except psycopg.Error as exc:
            raise LogUnavailable(f"cannot connect to the inspection log {self.location}: "
                                 f"{' '.join(str(exc).split())}") from None
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, timeout=timeout, open=False,
                                    check=ConnectionPool.check_connection, name="gaikan-log")
        self._pool.open(wait=True, timeout=timeout)
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    @contextmanager
    def _transaction(self, *, exclusive: bool = False) -> Iterator[Run]:
        psycopg = self._psycopg

        def run(sql: str, args: Sequence) -> list:
            cur = conn.execute(sql.replace("%", "%%").replace("?", "%s"), args)
            return cur.fetchall() if cur.description is not None else []

        try:
            with self._pool.connection() as conn:  # commits at exit, rolls back on an exception
                if exclusive:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.MIGRATION_LOCK,))
                yield run
        except psycopg.OperationalError as exc:  # server down or restarted, pool exhausted (PoolTimeout)
            raise LogUnavailable(f"the inspection log {self.location} is unavailable: "
                                 f"{' '.join(str(exc).split())}") from None

    def close(self) -> None:
        self._pool.close()


def redact_url(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user@host/db`` (for messages and logs)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}" if user else netloc))


def open_log(db: str | None, data_dir: str | os.PathLike | None = None) -> LogStore:
    """The log named by ``db`` (``gaikan serve --db``): None -> SQLite in ``data_dir``;
    ``sqlite:///PATH``; ``postgresql://...`` (or ``postgres://``)."""
    if db is None:
        if data_dir is None:
            raise ValueError("open_log needs a data directory for the default SQLite log")
        return SQLiteStore(Path(data_dir) / DB_NAME)
    scheme = db.split("://", 1)[0].lower() if "://" in db else ""
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(db)
    if scheme == "sqlite":
        path = db.split("://", 1)[1]
        if not path.startswith("/") or path == "/":
            raise GaikanError(f"--db {db}: write sqlite:///ABSOLUTE/PATH (three slashes, then the file)")
        return SQLiteStore(path)
    raise GaikanError(f"--db {redact_url(db)}: unknown database URL (expected postgresql://USER@HOST:PORT/DB "
                      "or sqlite:///PATH)")


class InspectionStore:
    """One service's storage: the log (:func:`open_log`) and the blob directory (thread-safe)."""

    def __init__(self, data_dir: str | os.PathLike, db: str | None = None):
        self.data_dir = Path(data_dir)
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise GaikanError(f"data directory {self.data_dir} exists and is not a directory")
        self.blob_dir = self.data_dir / "blobs"
        self.tmp_dir = self.data_dir / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._blob_dirs: set[Path] = set()
        self.log = open_log(db, self.data_dir)

    # ---- blobs ----------------------------------------------------------------------------------
    def blob_path(self, sha256: str, ext: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        if ext not in MEDIA_TYPES:
            raise ValueError(f"unknown blob extension {ext!r}")
        return self.blob_dir / sha256[:2] / f"{sha256}{ext}"

    def put_blob(self, data: bytes, kind: str = "png") -> tuple[str, str]:
        """Store bytes under their SHA-256 (idempotent); returns (sha256, extension)."""
        ext = BLOB_EXTENSIONS[kind]
        digest = sha256_bytes(data)
        path = self.blob_path(digest, ext)
        if not path.exists():
            tmp = self.tmp_dir / f"blob-{uuid.uuid4().hex}"
            with unavailable_on_errors("nothing was logged"):
                try:
                    if path.parent not in self._blob_dirs:  # one mkdir per shard directory, not per blob
                        path.parent.mkdir(parents=True, exist_ok=True)
                        self._blob_dirs.add(path.parent)
                    with open(tmp, "wb") as f:
                        f.write(data)
                    try:
                        os.replace(tmp, path)
                    except FileNotFoundError:  # the shard directory was removed since: make it again
                        path.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
        return digest, ext

    # ---- rows (the log) -------------------------------------------------------------------------
    def add(self, **fields) -> Inspection:
        return self.log.add(**fields)

    def get(self, inspection_id: int) -> Inspection | None:
        return self.log.get(inspection_id)

    def query(self, **kwargs) -> tuple[list[Inspection], int]:
        return self.log.query(**kwargs)

    def count(self) -> int:
        return self.log.count()

    def set_pictures(self, inspection_id: int, **sha256s: str) -> Inspection | None:
        return self.log.set_pictures(inspection_id, **sha256s)

    def add_review(self, inspection_id: int, **kwargs) -> Review:
        return self.log.add_review(inspection_id, **kwargs)

    def current_reviews(self, inspection_ids) -> dict[int, Review]:
        return self.log.current_reviews(inspection_ids)

    def review_queue(self, **kwargs) -> tuple[list[Inspection], int]:
        return self.log.review_queue(**kwargs)

    def recent_reviews(self, **kwargs) -> list[Review]:
        return self.log.recent_reviews(**kwargs)

    def reviewed_window(self, **kwargs) -> list[tuple]:
        return self.log.reviewed_window(**kwargs)

    def close(self) -> None:
        self.log.close()
