"""The inspection log behind one interface: SQLite and PostgreSQL (a real server) give the same rows
and the same answers; the schema is versioned (a newer log is refused, an old SQLite log opens);
replicas migrating one database together apply each migration once; many writers lose no row; a stopped
server is LogUnavailable on every call, saying what the request lost."""

import sqlite3
import threading

import pytest

from gaikan.errors import GaikanError
from gaikan.service.store import (COLUMN_TYPES, MIGRATIONS, SCHEMA_VERSION, LogUnavailable, PostgresStore,
                                  SQLiteStore, open_log, redact_url)


def fields(i: int, verdict: str = "OK", **over) -> dict:
    d = dict(created=1_700_000_000.0 + i * 10.0 + 0.123456789, part_id=f"p{i}", image_sha256=f"{i:064x}",
             image_ext=".png", image_width=300, image_height=200 + i, thumb_sha256=f"{i + 1:064x}",
             heatmap_sha256=None, overlay_sha256=f"{i + 2:064x}", score=0.1 * i + 1e-12 * i,
             verdict=verdict, threshold=0.55, threshold_method="conformal",
             p_value=None if i % 3 == 0 else 1.0 / (i + 3), model_id="padim-abc", model_checksum="c" * 64,
             timing_ms=12.5 + i)
    return d | over


@pytest.fixture(params=["sqlite", "postgresql"])
def log_url(request, tmp_path):
    return request.getfixturevalue("pg_url") if request.param == "postgresql" else f"sqlite:///{tmp_path}/log.db"


@pytest.fixture
def log(log_url):
    store = open_log(log_url)
    assert store.dialect == log_url.split(":")[0]
    yield store
    store.close()


def fill(store, n=9) -> list:
    return [store.add(**fields(i, "NG" if i % 4 == 1 else "OK")) for i in range(n)]


def test_rows_round_trip_and_queries_filter_page_and_order(log):
    added = fill(log)
    assert [r.id for r in added] == sorted({r.id for r in added})
    assert all(log.get(r.id) == r for r in added)  # every field back exactly, floats included
    assert log.get(10_000) is None and log.count() == 9
    page, total = log.query()
    assert total == 9 and [r.id for r in page] == [r.id for r in reversed(added)]
    ng, n_ng = log.query(verdict="NG")
    assert n_ng == 2 and {r.part_id for r in ng} == {"p1", "p5"}
    first = log.query(ng_first=True, limit=3)[0]
    assert [r.part_id for r in first] == ["p5", "p1", "p8"]
    assert [r.part_id for r in log.query(limit=2, offset=3)[0]] == ["p5", "p4"]
    t = added[4].created
    assert log.query(since=t)[1] == 5 and log.query(until=t)[1] == 4 and log.query(since=t, until=t + 15)[1] == 2
    with pytest.raises(ValueError, match="missing"):
        log.add(score=1.0)
    with pytest.raises(ValueError, match="unknown inspection fields"):
        log.add(**fields(0), colour="red")
    assert log.count() == 9  # refused rows left nothing behind


def test_sqlite_and_postgresql_hold_the_same_rows(pg_url, tmp_path):
    lite, pg = SQLiteStore(tmp_path / "log.sqlite3"), PostgresStore(pg_url)
    try:
        a, b = fill(lite), fill(pg)
        assert a == b
        for kwargs in ({}, {"verdict": "OK"}, {"ng_first": True, "limit": 4, "offset": 1}, {"since": a[3].created}):
            assert lite.query(**kwargs) == pg.query(**kwargs)
        assert lite.schema_version() == pg.schema_version() == SCHEMA_VERSION
    finally:
        lite.close()
        pg.close()


def test_a_log_with_a_newer_schema_is_refused(log_url):
    log = open_log(log_url)
    log.add(**fields(1))
    with log._transaction() as run:
        run("INSERT INTO schema_version VALUES (?, ?, ?, ?)", (SCHEMA_VERSION + 7, "from the future", "-", "9.9"))
    log.close()
    with pytest.raises(GaikanError, match=f"schema version {SCHEMA_VERSION + 7}.*knows versions up to"):
        open_log(log_url)


def test_an_existing_log_is_upgraded_by_an_appended_migration_and_keeps_its_rows(log_url, monkeypatch):
    from gaikan.service import store as store_module

    log = open_log(log_url)
    kept = fill(log, 3)
    log.close()
    new = ("audits", ["ALTER TABLE inspections ADD COLUMN note {text}",
                       "CREATE TABLE audits (id {id}, inspection_id {ref} NOT NULL REFERENCES inspections (id), "
                       "label {text} NOT NULL, at {float} NOT NULL)"])
    monkeypatch.setattr(store_module, "MIGRATIONS", [*MIGRATIONS, new])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    log = open_log(log_url)
    try:
        assert log.schema_version() == SCHEMA_VERSION + 1
        assert [log.get(r.id) for r in kept] == kept
        with log._transaction() as run:
            run("INSERT INTO audits (inspection_id, label, at) VALUES (?, ?, ?)", (kept[1].id, "false alarm", 1.5))
            assert run("SELECT note FROM inspections WHERE id = ?", (kept[0].id,)) == [(None,)]
            assert run("SELECT inspection_id, label FROM audits", ()) == [(kept[1].id, "false alarm")]
            described = run("SELECT description FROM schema_version ORDER BY version", ())
        assert described[-1] == ("audits",)
    finally:
        log.close()


def test_a_sqlite_log_from_before_the_version_table_opens_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)  # what gaikan 0.1 wrote: the version-1 table, PRAGMA user_version = 1
    for statement in MIGRATIONS[0][1]:
        db.execute(statement.format(**COLUMN_TYPES["sqlite"]))
    cols = [k for k in fields(0)] + ["created_utc"]
    db.execute(f"INSERT INTO inspections ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
               [*fields(0).values(), "2023-11-14T22:13:20.123Z"])
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    store = SQLiteStore(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION and store.count() == 1
        assert store.get(1).part_id == "p0" and store.add(**fields(1)).id == 2
    finally:
        store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_replicas_opening_a_fresh_database_together_migrate_it_once(pg_url):
    stores, errors = [], []

    def open_one():
        try:
            stores.append(PostgresStore(pg_url))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        with stores[0]._transaction() as run:
            assert run("SELECT version FROM schema_version ORDER BY version", ()) == [
                (v,) for v in range(1, SCHEMA_VERSION + 1)]
    finally:
        for s in stores:
            s.close()


def test_many_writers_on_one_database_lose_and_duplicate_nothing(pg_url):
    stores = [PostgresStore(pg_url), PostgresStore(pg_url)]  # two pools, as two replicas have
    acked, errors, lock = [], [], threading.Lock()

    def writer(k: int):
        for i in range(25):
            try:
                row = stores[k % 2].add(**fields(i, part_id=f"w{k}-{i}"))
            except Exception as exc:  # noqa: BLE001 - counted
                errors.append(repr(exc))
                continue
            with lock:
                acked.append((row.id, row.part_id))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors[:3]
        assert len(acked) == 200 and len({i for i, _ in acked}) == 200
        with stores[1]._transaction() as run:
            rows = run("SELECT id, part_id FROM inspections", ())
        assert sorted(rows) == sorted(acked)
    finally:
        for s in stores:
            s.close()


def test_database_urls_are_checked_and_passwords_never_shown(tmp_path):
    with pytest.raises(GaikanError, match="unknown database URL"):
        open_log("mysql://root:hunter2@db/x")
    with pytest.raises(GaikanError) as err:
        open_log("mysql://root:hunter2@db/x")
    assert "hunter2" not in str(err.value)
    with pytest.raises(GaikanError, match="ABSOLUTE"):
        open_log("sqlite://relative.db")
    store = open_log(f"sqlite:///{tmp_path}/chosen.sqlite3")
    store.add(**fields(0))
    store.close()
    assert (tmp_path / "chosen.sqlite3").is_file()
    assert redact_url("postgresql://u:pw@h:5/d") == "postgresql://u@h:5/d"


def test_an_unreachable_postgresql_is_a_clear_error(postgres):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LogUnavailable, match=f"cannot connect to the inspection log postgresql://gaikan@127.0.0.1:"
                                             f"{port}/x") as err:
        PostgresStore(f"postgresql://gaikan:s3cret@127.0.0.1:{port}/x", timeout=2)
    assert "s3cret" not in str(err.value)
    with pytest.raises(LogUnavailable, match="does not exist"):
        PostgresStore(postgres.url("no_such_db"), timeout=2)


def test_a_restarted_server_is_reconnected_to_and_a_stopped_one_is_log_unavailable():
    from gaikan.service.pgtemp import TempPostgres, missing_reason

    if missing_reason():
        pytest.skip(missing_reason())
    with TempPostgres() as pg:
        store = PostgresStore(pg.create_database("restart"), timeout=3)
        try:
            first = store.add(**fields(0))
            pg.pg_ctl("restart", "-m", "fast")
            assert store.add(**fields(1)).id > first.id  # stale pooled connections were replaced
            pg.pg_ctl("stop", "-m", "fast")
            with pytest.raises(LogUnavailable, match="inspection log postgresql://gaikan@127.0.0.1.* unavailable"
                                                     ".*nothing was logged: retry later"):
                store.add(**fields(2))
            # the review loop's reads and writes say what the outage means for the request too
            for call, says in [(lambda: store.add_review(first.id, label="false_alarm", reviewer="op"),
                                "the review was not recorded"),
                               (lambda: store.set_pictures(first.id, thumb="0" * 64), "the pictures were not recorded"),
                               (lambda: store.current_reviews([first.id]), "the log could not be read"),
                               (lambda: store.review_queue(), "the log could not be read"),
                               (lambda: store.recent_reviews(), "the log could not be read"),
                               (lambda: store.reviewed_window(), "the log could not be read")]:
                with pytest.raises(LogUnavailable, match=f"unavailable.*{says}: retry later"):
                    call()
        finally:
            store.close()


def test_reviews_and_pictures_give_the_same_answers_on_both_backends(log):
    """The merged schema versions 2 (issue 9: pictures drawn later) and 3 (issue 9ui: reviews) through
    the LogStore methods, on SQLite and PostgreSQL."""
    added = fill(log)  # NG: p1, p5
    assert log.set_pictures(added[0].id, heatmap="e" * 64).heatmap_sha256 == "e" * 64
    assert log.set_pictures(added[0].id, heatmap="f" * 64).heatmap_sha256 == "e" * 64  # drawn once, kept
    queue, n = log.review_queue()
    assert n == 2 and [r.part_id for r in queue] == ["p5", "p1"]
    log.add_review(added[1].id, label="defect", defect_type="ひび割れ", reviewer="alice", created=5.0)
    log.add_review(added[1].id, label="false_alarm", reviewer="bob", created=6.0)  # supersedes alice's
    with pytest.raises(ValueError, match="needs a defect_type"):
        log.add_review(added[5].id, label="defect", reviewer="alice")
    assert [r.part_id for r in log.review_queue()[0]] == ["p5"]
    current = log.current_reviews([r.id for r in added])
    assert set(current) == {added[1].id} and (current[added[1].id].reviewer, current[added[1].id].label) == (
        "bob", "false_alarm")
    assert [(r.reviewer, r.defect_type) for r in log.recent_reviews()] == [("bob", None), ("alice", "ひび割れ")]
    window = log.reviewed_window()
    assert [w[0] for w in window] == [r.id for r in reversed(added)]
    assert {w[0]: w[6] for w in window if w[6]} == {added[1].id: "false_alarm"}  # only the current review
