"""The inspection service's log: one SQLite row per inspection (WAL mode, committed before the
service answers), and the images it refers to stored on disk under their SHA-256.

Layout of a data directory::

    DATA_DIR/inspections.sqlite3        the log (plus its -wal / -shm files while open)
    DATA_DIR/blobs/ab/abcdef....png     images, thumbnails, heat maps, overlays, named by their hash
    DATA_DIR/tmp/                       uploads being decoded (random names; removed afterwards)

Durability: blobs are written (temporary name, then an atomic rename) before the row that names
them is inserted, and the row is committed with ``synchronous=FULL`` before the HTTP response is
sent, so a client that got an answer finds its inspection in the log even if the process is
killed right after. When the log cannot take a row (locked by another process past
``BUSY_TIMEOUT_S``, disk full, I/O error) or a blob cannot be written, the store raises
``gaikan.service.errors.StoreUnavailable`` (the service answers 503 with Retry-After): the row was
not written, so no acknowledged inspection is lost. Nothing a client sends (file names included) becomes part of a path: blob
names are hex digests and the extension comes from a fixed table.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from gaikan.errors import GaikanError
from gaikan.service.errors import StoreUnavailable

DB_NAME = "inspections.sqlite3"
SCHEMA_VERSION = 1
#: how long a write waits for a lock held by another connection before the request gets a 503
BUSY_TIMEOUT_S = 5.0

#: blob extensions we write (the key is what the caller asks for; nothing else is accepted)
BLOB_EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "bmp": ".bmp", "tiff": ".tif", "gif": ".gif",
                   "webp": ".webp", "bin": ".bin"}
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".bmp": "image/bmp", ".tif": "image/tiff",
               ".gif": "image/gif", ".webp": "image/webp", ".bin": "application/octet-stream"}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS inspections (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    created         REAL    NOT NULL,          -- unix time (s)
    created_utc     TEXT    NOT NULL,          -- ISO 8601, UTC
    part_id         TEXT,
    image_sha256    TEXT    NOT NULL,
    image_ext       TEXT    NOT NULL,
    image_width     INTEGER NOT NULL,
    image_height    INTEGER NOT NULL,
    thumb_sha256    TEXT,
    heatmap_sha256  TEXT,
    overlay_sha256  TEXT,
    score           REAL    NOT NULL,
    verdict         TEXT    NOT NULL CHECK (verdict IN ('OK', 'NG')),
    threshold       REAL    NOT NULL,
    threshold_method TEXT   NOT NULL,
    p_value         REAL,
    model_id        TEXT    NOT NULL,
    model_checksum  TEXT    NOT NULL,
    timing_ms       REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS inspections_verdict ON inspections (verdict, id);
CREATE INDEX IF NOT EXISTS inspections_created ON inspections (created);
PRAGMA user_version = {SCHEMA_VERSION};
"""


@dataclass
class Inspection:
    """One row of the log."""

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

    def to_dict(self) -> dict:
        return asdict(self)


_COLUMNS = [f for f in Inspection.__dataclass_fields__]
_SQLITE_MIN, _SQLITE_MAX = -(2**63), 2**63 - 1  # SQLite INTEGER range


@contextlib.contextmanager
def unavailable_on_errors(what: str):
    """sqlite3 operational/database errors and OSError -> StoreUnavailable (503); programming and
    integrity errors (bugs) pass through."""
    try:
        yield
    except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
        raise
    except sqlite3.DatabaseError as exc:
        raise StoreUnavailable(f"the inspection log is unavailable ({' '.join(str(exc).split())}); {what}: "
                               "retry later") from None
    except OSError as exc:
        from gaikan.io.atomic import describe_os_error

        raise StoreUnavailable(f"the service cannot store data ({describe_os_error(exc)}); {what}: "
                               "retry later") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class InspectionStore:
    """The SQLite log and the blob directory of one service data directory (thread-safe)."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir)
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise GaikanError(f"data directory {self.data_dir} exists and is not a directory")
        self.blob_dir = self.data_dir / "blobs"
        self.tmp_dir = self.data_dir / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.data_dir / DB_NAME
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None,
                                       timeout=BUSY_TIMEOUT_S)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise GaikanError(f"{self.db_path} has log schema version {version}; this gaikan writes "
                                  f"version {SCHEMA_VERSION}: use another --data-dir")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise GaikanError(f"{self.db_path} is not a usable inspection log: {exc}") from None

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
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with open(tmp, "wb") as f:
                        f.write(data)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
        return digest, ext

    def temp_path(self, ext: str = ".bin") -> Path:
        """A fresh random path in the data directory's tmp/ (the caller removes it)."""
        return self.tmp_dir / f"upload-{uuid.uuid4().hex}{ext}"

    # ---- rows -----------------------------------------------------------------------------------
    def add(self, **fields) -> Inspection:
        """Insert one inspection and commit it before returning (the caller answers the client after)."""
        now = time.time()
        fields.setdefault("created", now)
        fields.setdefault("created_utc", time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(fields["created"]))
                          + f".{int((fields['created'] % 1) * 1000):03d}Z")
        cols = [c for c in _COLUMNS if c != "id"]
        missing = [c for c in cols if c not in fields]
        if missing:
            raise ValueError(f"inspection fields missing: {missing}")
        values = [fields[c] for c in cols]
        with self._lock, unavailable_on_errors("nothing was logged"):
            cur = self._db.execute(
                f"INSERT INTO inspections ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})", values)
            row_id = cur.lastrowid
        return Inspection(id=row_id, **{c: fields[c] for c in cols})

    def get(self, inspection_id: int) -> Inspection | None:
        if not _SQLITE_MIN <= int(inspection_id) <= _SQLITE_MAX:  # no such row (and no OverflowError)
            return None
        with self._lock, unavailable_on_errors("the log could not be read"):
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM inspections WHERE id = ?",
                                   (int(inspection_id),)).fetchone()
        return None if row is None else Inspection(*row)

    def query(self, *, verdict: str | None = None, since: float | None = None, until: float | None = None,
              limit: int = 50, offset: int = 0, ng_first: bool = False) -> tuple[list[Inspection], int]:
        """Newest first (NG before OK with ``ng_first``); returns (page, total matching)."""
        where, args = [], []
        if verdict is not None:
            where.append("verdict = ?")
            args.append(verdict)
        if since is not None:
            where.append("created >= ?")
            args.append(float(since))
        if until is not None:
            where.append("created < ?")
            args.append(float(until))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        order = "(verdict = 'NG') DESC, id DESC" if ng_first else "id DESC"
        with self._lock, unavailable_on_errors("the log could not be read"):
            total = self._db.execute(f"SELECT COUNT(*) FROM inspections {clause}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM inspections {clause} ORDER BY {order} LIMIT ? OFFSET ?",
                [*args, min(int(limit), _SQLITE_MAX), min(int(offset), _SQLITE_MAX)]).fetchall()
        return [Inspection(*r) for r in rows], int(total)

    def count(self) -> int:
        with self._lock, unavailable_on_errors("the log could not be read"):
            return int(self._db.execute("SELECT COUNT(*) FROM inspections").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
