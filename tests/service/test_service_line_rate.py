"""The service's line-rate scoring path (issue 9): onnxruntime by default and equal to torch,
micro-batching that gives every request its own score, pictures drawn on first request, several
models with routes and a swap that drops nothing, and the v1 -> v2 log upgrade."""

import io
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from gaikan.detectors.base import load_detector
from gaikan.errors import SettingsError
from gaikan.service.app import InspectionService, create_app
from gaikan.service.models import parse_model_specs
from gaikan.service.scoring import MicroBatcher
from gaikan.service.store import SCHEMA_VERSION, InspectionStore

KEY = "line-rate-key"
H = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def second_model(service_split, tmp_path_factory):
    """Another version of the product's model (fewer features: other weights, other scores)."""
    from gaikan.detectors.padim import PaDiM

    det = PaDiM(image_size=64, n_features=20, seed=1)
    det.fit(service_split.train.images, validation_fraction=0.2, threshold_method="conformal",
            false_alarm_rate=0.1)
    path = tmp_path_factory.mktemp("second_model") / "padim-v2"
    det.save(path)
    return path


def post(client, data, url="/v1/inspect", part_id=None):
    form = {"part_id": part_id} if part_id else {}
    return client.post(url, files={"file": ("p.png", data, "image/png")}, data=form, headers=H)


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_onnxruntime_is_the_default_and_scores_like_torch(service_model, tmp_path, uploads):
    det = load_detector(service_model)
    images = uploads["good"][:3] + uploads["defect"][:3]
    expected = det.score([decoded(d) for d in images]).scores
    results = {}
    for runtime in ("auto", "torch"):
        with TestClient(create_app(service_model, tmp_path / runtime, KEY, runtime=runtime)) as c:
            info = c.get("/v1/models/default", headers=H).json()
            results[info["runtime"]] = [post(c, d).json() for d in images]
            # PaDiM's graph has a stage cut: its features and its head are batched apart, and the head
            # (memory-bound) gets the large batches
            assert ("batched apart" in info["runtime_note"]) == (runtime == "auto"), info["runtime_note"]
            assert info["max_batch"] == 8
    assert set(results) == {"onnx", "torch"}
    for runtime, answers in results.items():
        np.testing.assert_allclose([a["score"] for a in answers], expected, rtol=1e-4, err_msg=runtime)
        assert [a["verdict"] for a in answers] == ["OK"] * 3 + ["NG"] * 3
    assert (tmp_path / "auto" / "onnx").is_dir() and not (tmp_path / "torch" / "onnx").exists()


def test_a_one_stage_graph_gets_small_batches_unless_told(tmp_path, service_split):
    """PatchCore's graph has no stage cut and costs the same per image at any batch size: its own max
    batch is 2 (shorter waits), and --max-batch still sets it."""
    from gaikan.detectors.patchcore import PatchCore

    det = PatchCore(image_size=64, coreset_fraction=0.1)
    det.fit(service_split.train.images, validation_fraction=0.2)
    det.save(tmp_path / "pc")
    for asked, expected in ((0, 2), (6, 6)):
        service = InspectionService(tmp_path / "pc", tmp_path / f"d{asked}", max_batch=asked)
        try:
            served = service.registry.get("default")
            assert served.runtime == "onnx" and served.batcher.max_batch == expected
        finally:
            service.close()


def test_concurrent_requests_are_batched_and_each_gets_its_own_score(service_model, tmp_path, uploads):
    images = uploads["defect"][:4] + uploads["good"][:4]
    service = InspectionService(service_model, tmp_path / "d", workers=1, max_batch=8, max_wait_ms=50)
    try:
        alone = [service.inspect_bytes(d) for d in images]
        assert all(a["timing"]["batch_size"] == 1 for a in alone)
        served = service.registry.get("default")
        gate = threading.Event()
        run = served.batcher._stages[-1]  # the batching stage (PaDiM's head; the whole graph if one)
        blocked: list[int] = []  # the size of the batch the worker holds while the gate is closed

        def gated(items):
            if not gate.is_set():
                blocked.append(len(items))
                gate.wait(30)
            return run(items)

        served.batcher._stages[-1] = gated
        answers = [None] * len(images)
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, service.inspect_bytes(images[i])))
                   for i in range(len(images))]
        for t in threads:
            t.start()
        # the first batch (the first request, and any that came within max_wait) holds the blocked
        # worker; every other request queues up behind it
        deadline = time.time() + 30
        while (not blocked or served.queue_length() < len(images) - blocked[0]) and time.time() < deadline:
            time.sleep(0.02)
        gate.set()
        for t in threads:
            t.join(30)
        served.batcher._stages[-1] = run
        sizes = sorted(a["timing"]["batch_size"] for a in answers)
        # two batches: the blocked one and all the queued requests together
        assert len(blocked) == 1 and sizes == sorted([blocked[0]] * blocked[0] + [len(images) - blocked[0]]
                                                     * (len(images) - blocked[0])), (blocked, sizes)
        assert max(sizes) >= len(images) // 2
        np.testing.assert_allclose([a["score"] for a in answers], [a["score"] for a in alone], rtol=1e-5)
        assert [a["verdict"] for a in answers] == [a["verdict"] for a in alone]
        assert service.store.count() == 2 * len(images)
    finally:
        service.close()


def test_a_lone_request_does_not_wait_to_fill_a_batch(service_model, tmp_path, uploads):
    service = InspectionService(service_model, tmp_path / "d", max_batch=8, max_wait_ms=3000)
    try:
        service.inspect_bytes(uploads["good"][0])
        t0 = time.perf_counter()
        answer = service.inspect_bytes(uploads["good"][1])
        assert time.perf_counter() - t0 < 2.0 and answer["timing"]["batch_size"] == 1
    finally:
        service.close()


def test_a_failing_request_in_a_batch_fails_alone():
    def run(items):  # the "graph" takes (2, 2) inputs only and refuses a batch holding another shape
        if any(item.shape != (2, 2) for item in items):
            raise ValueError("input of the wrong shape")
        batch = np.stack(items)
        return batch.reshape(len(items), -1).sum(axis=1), [None] * len(items)

    gate = threading.Event()
    batcher = MicroBatcher(lambda items: (gate.wait(10), run(items))[1], workers=1, max_batch=8, max_wait_ms=0)
    try:
        first = batcher.submit(np.ones((2, 2)))
        time.sleep(0.1)  # the worker holds `first`; the next three are batched together
        futures = [batcher.submit(np.full((2, 2), 2.0)), batcher.submit(np.ones((3, 3))),
                   batcher.submit(np.full((2, 2), 3.0))]
        gate.set()
        assert first.result(10).score == 4.0
        assert futures[0].result(10).score == 8.0 and futures[2].result(10).score == 12.0
        with pytest.raises(ValueError):
            futures[1].result(10)
    finally:
        batcher.close()


def _two_stages(gate: threading.Event, head_batches: list[int]):
    """A features stage (held until ``gate`` opens) and a head that refuses any item not (2, 2)."""
    def features(items):
        gate.wait(10)
        return [2.0 * item for item in items]

    def head(items):
        if any(item.shape != (2, 2) for item in items):
            raise ValueError("input of the wrong shape")
        head_batches.append(len(items))
        return np.stack(items).reshape(len(items), -1).sum(axis=1), [None] * len(items)

    return features, head


def test_staged_batching_gives_the_head_every_request_in_flight():
    gate, head_batches = threading.Event(), []
    batcher = MicroBatcher(_two_stages(gate, head_batches), workers=2, max_batch=8, max_wait_ms=0)
    try:
        futures = [batcher.submit(np.full((2, 2), float(i))) for i in range(6)]
        time.sleep(0.1)  # both workers hold one item each in the features stage; four are queued
        assert batcher.queue_length == 4
        gate.set()
        results = [f.result(10) for f in futures]
        assert [r.score for r in results] == [8.0 * i for i in range(6)]  # each its own score
        # the features ran one item at a time on both workers; the head once, on all six
        assert head_batches == [6] and {r.batch_size for r in results} == {6}
        assert all(r.score_ms > 0 for r in results)
    finally:
        batcher.close()


def test_staged_batching_caps_the_head_at_max_batch_and_a_failing_item_fails_alone():
    gate, head_batches = threading.Event(), []
    batcher = MicroBatcher(_two_stages(gate, head_batches), workers=2, max_batch=4, max_wait_ms=0)
    items = [np.full((2, 2), float(i)) for i in range(9)]
    items[5] = np.ones((3, 3))
    futures = [batcher.submit(item) for item in items]
    gate.set()
    batcher.close()  # closing drains: every queued item still gets its answer
    for i, future in enumerate(futures):
        if i == 5:
            with pytest.raises(ValueError):
                future.result(10)
        else:
            assert future.result(10).score == 8.0 * i
    assert max(head_batches) <= 4 and sum(head_batches) == 8


def test_pictures_are_drawn_on_first_request_like_the_eager_ones(service_model, tmp_path, uploads):
    bad = uploads["defect"][0]
    with TestClient(create_app(service_model, tmp_path / "eager", KEY, figures="eager")) as c:
        eager = post(c, bad).json()
        eager_pictures = {k: decoded(c.get(eager["links"][k], headers=H).content) for k in ("thumb", "heatmap")}
    with TestClient(create_app(service_model, tmp_path / "lazy", KEY)) as c:
        lazy = post(c, bad).json()
        assert lazy["heatmap_sha256"] is None and lazy["thumb_sha256"] is None and lazy["map_sha256"]
        assert lazy["links"]["heatmap"] and lazy["links"]["overlay"]
        # nothing drawn yet: the only PNG stored is the upload itself
        assert [p.name for p in (tmp_path / "lazy" / "blobs").rglob("*.png")] == [f"{lazy['image_sha256']}.png"]
        got = {k: c.get(lazy["links"][k], headers=H) for k in ("heatmap", "thumb", "overlay")}
        assert all(r.status_code == 200 and r.headers["content-type"] == "image/png" for r in got.values())
        row = c.get(lazy["links"]["self"], headers=H).json()
        assert row["heatmap_sha256"] and row["thumb_sha256"] and row["overlay_sha256"]
        assert c.get(lazy["links"]["heatmap"], headers=H).content == got["heatmap"].content  # stored once
    np.testing.assert_array_equal(decoded(got["thumb"].content), eager_pictures["thumb"])
    heat = decoded(got["heatmap"].content).astype(int)
    assert heat.shape == eager_pictures["heatmap"].shape
    # the map is kept as float16: colours differ by at most one step of the 256-colour scale, rarely
    assert np.mean(np.abs(heat - eager_pictures["heatmap"]).max(axis=2) > 8) < 0.01


def test_ng_only_figures_keep_heat_maps_for_ng_parts_only(service_model, tmp_path, uploads):
    with TestClient(create_app(service_model, tmp_path / "ng", KEY, figures="ng")) as c:
        ok, ng = post(c, uploads["good"][0]).json(), post(c, uploads["defect"][0]).json()
        assert ok["verdict"] == "OK" and ng["verdict"] == "NG"
        assert ok["map_sha256"] is None and ok["links"]["heatmap"] is None
        assert c.get(f"/v1/inspections/{ok['id']}/heatmap", headers=H).status_code == 404
        assert c.get(ok["links"]["thumb"], headers=H).status_code == 200
        assert c.get(ng["links"]["overlay"], headers=H).status_code == 200
    with pytest.raises(SettingsError, match="figures must be one of"):
        InspectionService(service_model, tmp_path / "x", figures="sometimes")


def test_several_models_have_their_routes_and_their_rows(service_model, second_model, tmp_path, uploads):
    ids = {}
    with TestClient(create_app({"mono": service_model, "poly": second_model}, tmp_path / "d", KEY)) as c:
        models = {m["name"]: m for m in c.get("/v1/models", headers=H).json()["models"]}
        assert set(models) == {"mono", "poly"} and models["mono"]["model_id"] != models["poly"]["model_id"]
        r = post(c, uploads["good"][0])
        assert r.status_code == 400 and "mono, poly" in r.json()["detail"]
        for name in ("mono", "poly"):
            a = post(c, uploads["defect"][0], url=f"/v1/models/{name}/inspect", part_id=name).json()
            assert a["model_name"] == name and a["model_id"] == models[name]["model_id"]
            assert a["model_version"] == models[name]["model_version"]
            assert a["threshold"] == pytest.approx(models[name]["threshold"])
            ids[name] = a["id"]
        assert post(c, uploads["good"][0], url="/v1/models/nope/inspect").status_code == 404
        assert c.get("/v1/models/nope", headers=H).status_code == 404
    db = sqlite3.connect(tmp_path / "d" / "inspections.sqlite3")
    rows = dict(db.execute("SELECT part_id, model_name || ' ' || model_id || ' ' || model_version FROM inspections"))
    assert rows == {n: f"{n} {models[n]['model_id']} {models[n]['model_version']}" for n in ("mono", "poly")}
    assert parse_model_specs(["a=/x", "b=/y"]) == {"a": Path("/x"), "b": Path("/y")}
    assert parse_model_specs([str(service_model)]) == {"default": service_model}
    with pytest.raises(SettingsError, match="give each one a name"):
        parse_model_specs([str(service_model), str(second_model)])
    with pytest.raises(SettingsError, match="given twice"):
        parse_model_specs(["a=/x", "a=/y"])


def test_swapping_a_model_under_load_drops_no_request(service_model, second_model, tmp_path, uploads):
    images = uploads["good"] + uploads["defect"]
    acked, failures = [], []
    stop = threading.Event()
    with TestClient(create_app({"line1": service_model}, tmp_path / "d", KEY)) as c:
        old_id = c.get("/v1/models/line1", headers=H).json()["model_id"]

        def client(k: int) -> None:
            i = 0
            while not stop.is_set():
                part = f"c{k}-{i}"
                r = post(c, images[(k + i) % len(images)], url="/v1/models/line1/inspect", part_id=part)
                if r.status_code != 200:
                    failures.append((part, r.status_code, r.text))
                else:
                    acked.append((r.json()["id"], part, r.json()["model_id"]))
                i += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        while len(acked) < 6 and not failures:
            time.sleep(0.02)
        swap = c.post("/v1/models/line1/swap", json={"model_dir": str(second_model)}, headers=H)
        n_at_swap = len(acked)
        deadline = time.time() + 60
        while len(acked) < n_at_swap + 6 and not failures and time.time() < deadline:
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join(60)
        bad_swap = c.post("/v1/models/line1/swap", json={"model_dir": str(tmp_path / "none")}, headers=H)
        assert bad_swap.status_code == 422 and "no model" in bad_swap.json()["detail"]
        assert c.post("/v1/models/other/swap", json={"model_dir": str(second_model)}, headers=H).status_code == 404
    assert swap.status_code == 200, swap.text
    new_id = swap.json()["current"]["model_id"]
    assert swap.json()["previous"]["model_id"] == old_id != new_id
    assert not failures, failures[:3]
    served_by = [m for _, _, m in sorted(acked)]
    assert set(served_by) == {old_id, new_id} and served_by[-1] == new_id
    db = sqlite3.connect(tmp_path / "d" / "inspections.sqlite3")
    rows = {r[0]: (r[1], r[2]) for r in db.execute("SELECT id, part_id, model_id FROM inspections")}
    assert rows == {i: (p, m) for i, p, m in acked}  # exactly one row per answer, with its model


def test_a_version_1_log_is_upgraded_in_place(tmp_path):
    data = tmp_path / "old"
    data.mkdir()
    db = sqlite3.connect(data / "inspections.sqlite3")
    db.executescript("""
        CREATE TABLE inspections (id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL,
          created_utc TEXT NOT NULL, part_id TEXT, image_sha256 TEXT NOT NULL, image_ext TEXT NOT NULL,
          image_width INTEGER NOT NULL, image_height INTEGER NOT NULL, thumb_sha256 TEXT, heatmap_sha256 TEXT,
          overlay_sha256 TEXT, score REAL NOT NULL, verdict TEXT NOT NULL, threshold REAL NOT NULL,
          threshold_method TEXT NOT NULL, p_value REAL, model_id TEXT NOT NULL, model_checksum TEXT NOT NULL,
          timing_ms REAL NOT NULL);
        INSERT INTO inspections VALUES (NULL, 1.0, '1970', 'old', 'ab', '.png', 8, 8, NULL, NULL, NULL,
          0.5, 'OK', 1.0, 'conformal', 0.7, 'padim-x', 'cc', 3.0);
        PRAGMA user_version = 1;""")
    db.close()
    store = InspectionStore(data)
    old = store.get(1)
    assert old.part_id == "old" and old.model_name is None and old.drift is None and old.map_sha256 is None
    new = store.add(part_id="new", image_sha256="cd", image_ext=".png", image_width=8, image_height=8,
                    thumb_sha256=None, heatmap_sha256=None, overlay_sha256=None, score=2.0, verdict="NG",
                    threshold=1.0, threshold_method="conformal", p_value=0.01, model_id="padim-y",
                    model_checksum="dd", timing_ms=1.0, model_name="mono", model_version="2", drift=1)
    assert store.get(new.id).model_version == "2" and store.get(new.id).drift == 1
    assert store.set_pictures(1, thumb="ee").thumb_sha256 == "ee"
    assert store.set_pictures(1, thumb="ff").thumb_sha256 == "ee"  # drawn once, kept
    store.close()
    assert sqlite3.connect(data / "inspections.sqlite3").execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
