"""The inspection service's log: one SQLite row per inspection (WAL mode, committed before the
service answers), and the images it refers to stored on disk under their SHA-256.

Layout of a data directory::

    DATA_DIR/inspections.sqlite3        the log (plus its -wal / -shm files while open)
    DATA_DIR/blobs/ab/abcdef....png     images, thumbnails, heat maps, overlays, named by their hash
    DATA_DIR/tmp/                       uploads being decoded (random names; removed afterwards)

Durability: blobs are written (temporary name, then an atomic rename) before the row that names
them is inserted, and the row is committed with ``synchronous=FULL`` before the HTTP response is
sent, so a client that got an answer finds its inspection in the log even if the process is
killed right after. Nothing a client sends (file names included) becomes part of a path: blob
names are hex digests and the extension comes from a fixed table.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from gaikan.errors import GaikanError

DB_NAME = "inspections.sqlite3"
SCHEMA_VERSION = 1

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

#: operators' reviews of NG verdicts (append-only: a later review of the same inspection supersedes
#: the earlier one, which stays as history). Added to an existing log on open (IF NOT EXISTS), so a
#: log written before reviews existed keeps working. The queries on it are plain SQL (no SQLite-only
#: functions) so that they run unchanged on PostgreSQL.
REVIEW_LABELS = ("false_alarm", "defect")
_REVIEW_SCHEMA = """
CREATE TABLE IF NOT EXISTS reviews (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    inspection_id   INTEGER NOT NULL REFERENCES inspections (id),
    created         REAL    NOT NULL,          -- unix time (s)
    created_utc     TEXT    NOT NULL,          -- ISO 8601, UTC
    reviewer        TEXT    NOT NULL,          -- the API key's name
    label           TEXT    NOT NULL CHECK (label IN ('false_alarm', 'defect')),
    defect_type     TEXT,                      -- set iff label = 'defect'
    CHECK ((label = 'defect') = (defect_type IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS reviews_inspection ON reviews (inspection_id, id);
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


_COLUMNS = [f for f in Inspection.__dataclass_fields__]
_REVIEW_COLUMNS = [f for f in Review.__dataclass_fields__]
# the current review of inspection i: its latest one
_CURRENT_REVIEW = "reviews.id = (SELECT MAX(r2.id) FROM reviews r2 WHERE r2.inspection_id = {i}.id)"


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


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
            self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise GaikanError(f"{self.db_path} has log schema version {version}; this gaikan writes "
                                  f"version {SCHEMA_VERSION}: use another --data-dir")
            self._db.executescript(_SCHEMA)
            self._db.executescript(_REVIEW_SCHEMA)
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
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.tmp_dir / f"blob-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return digest, ext

    def temp_path(self, ext: str = ".bin") -> Path:
        """A fresh random path in the data directory's tmp/ (the caller removes it)."""
        return self.tmp_dir / f"upload-{uuid.uuid4().hex}{ext}"

    # ---- rows -----------------------------------------------------------------------------------
    def add(self, **fields) -> Inspection:
        """Insert one inspection and commit it before returning (the caller answers the client after)."""
        now = time.time()
        fields.setdefault("created", now)
        fields.setdefault("created_utc", _utc(fields["created"]))
        cols = [c for c in _COLUMNS if c != "id"]
        missing = [c for c in cols if c not in fields]
        if missing:
            raise ValueError(f"inspection fields missing: {missing}")
        values = [fields[c] for c in cols]
        with self._lock:
            cur = self._db.execute(
                f"INSERT INTO inspections ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})", values)
            row_id = cur.lastrowid
        return Inspection(id=row_id, **{c: fields[c] for c in cols})

    def get(self, inspection_id: int) -> Inspection | None:
        with self._lock:
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
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM inspections {clause}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM inspections {clause} ORDER BY {order} LIMIT ? OFFSET ?",
                [*args, int(limit), int(offset)]).fetchall()
        return [Inspection(*r) for r in rows], int(total)

    # ---- reviews (plain SQL: runs on SQLite and PostgreSQL) ----------------------------------------
    def add_review(self, inspection_id: int, *, label: str, reviewer: str, defect_type: str | None = None,
                   created: float | None = None) -> Review:
        """Record a review of one inspection and commit it (a later review supersedes an earlier one)."""
        if label not in REVIEW_LABELS:
            raise ValueError(f"review label must be one of {REVIEW_LABELS}, not {label!r}")
        if (label == "defect") != (defect_type is not None):
            raise ValueError("a 'defect' review needs a defect_type; a 'false_alarm' review has none")
        created = time.time() if created is None else float(created)
        values = [int(inspection_id), created, _utc(created), reviewer, label, defect_type]
        cols = _REVIEW_COLUMNS[1:]
        with self._lock:
            cur = self._db.execute(f"INSERT INTO reviews ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                                   values)
            row_id = cur.lastrowid
        return Review(row_id, *values)

    def current_reviews(self, inspection_ids) -> dict[int, Review]:
        """{inspection id: its latest review} for those of ``inspection_ids`` that have one."""
        ids = [int(i) for i in inspection_ids]
        if not ids:
            return {}
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_REVIEW_COLUMNS)} FROM reviews WHERE inspection_id IN "
                f"({', '.join('?' for _ in ids)}) ORDER BY id", ids).fetchall()
        return {r.inspection_id: r for r in (Review(*row) for row in rows)}  # later ids overwrite

    def review_queue(self, *, limit: int = 50, offset: int = 0,
                     model_id: str | None = None) -> tuple[list[Inspection], int]:
        """NG inspections nobody has reviewed yet, newest first; returns (page, total in the queue)."""
        where = "verdict = 'NG' AND NOT EXISTS (SELECT 1 FROM reviews WHERE reviews.inspection_id = inspections.id)"
        args: list = []
        if model_id is not None:
            where += " AND model_id = ?"
            args.append(model_id)
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM inspections WHERE {where}", args).fetchone()[0]
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM inspections WHERE {where} "
                                    "ORDER BY id DESC LIMIT ? OFFSET ?", [*args, int(limit), int(offset)]).fetchall()
        return [Inspection(*r) for r in rows], int(total)

    def recent_reviews(self, *, limit: int = 20) -> list[Review]:
        """The latest reviews (all of them, superseded ones included), newest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_REVIEW_COLUMNS)} FROM reviews ORDER BY id DESC LIMIT ?",
                                    (int(limit),)).fetchall()
        return [Review(*r) for r in rows]

    def reviewed_window(self, *, since: float | None = None, until: float | None = None,
                        model_id: str | None = None, limit: int = 50_000) -> list[tuple]:
        """The newest ``limit`` inspections in [since, until) as tuples (id, created, score, verdict,
        threshold, p_value, current review label or None, its defect_type), newest first."""
        where, args = [], []
        if since is not None:
            where.append("inspections.created >= ?")
            args.append(float(since))
        if until is not None:
            where.append("inspections.created < ?")
            args.append(float(until))
        if model_id is not None:
            where.append("inspections.model_id = ?")
            args.append(model_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        sql = ("SELECT inspections.id, inspections.created, inspections.score, inspections.verdict, "
               "inspections.threshold, inspections.p_value, reviews.label, reviews.defect_type "
               f"FROM inspections LEFT JOIN reviews ON {_CURRENT_REVIEW.format(i='inspections')} "
               f"{clause} ORDER BY inspections.id DESC LIMIT ?")
        with self._lock:
            return [tuple(r) for r in self._db.execute(sql, [*args, int(limit)]).fetchall()]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM inspections").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
