"""The HTTP inspection service (FastAPI): ``create_app(models, data_dir, api_key, ...)``.

Endpoints (OpenAPI docs at ``/docs``, schema at ``/openapi.json``)::

    POST /v1/inspect                     multipart: file (the image), part_id (optional) -> verdict
                                         (only when one model is served)
    POST /v1/models/{name}/inspect       the same with the model served under {name}
    GET  /v1/models, /v1/models/{name}   the served models: id, version, runtime, threshold, batching
    POST /v1/models/{name}/swap          JSON {"model_dir": DIR}: serve a new version, dropping nothing
    GET  /v1/drift, /v1/models/{name}/drift   the drift flags (gaikan.service.monitor)
    GET  /v1/inspections                 paged log; ?verdict=OK|NG&since=&until=&limit=&offset=&order=
    GET  /v1/inspections/{id}            one inspection
    GET  /v1/inspections/{id}/{kind}     its stored image: image | thumb | heatmap | overlay (pictures
                                         drawn on their first request unless figures="eager")
    GET  /metrics                        Prometheus text format (no key needed: aggregate counts only)
    GET  /v1/review-queue, /v1/reviews, /v1/stats; POST /v1/inspections/{id}/review
                                         the dashboard's review loop and charts (gaikan.service.dashboard)
    GET  /healthz                        liveness + model id (no key needed)
    GET  /                               the web page (static files, no key needed; the page asks for it)

Each model is loaded once (``gaikan.service.models``): onnxruntime where it exports, torch
otherwise. A request decodes its upload in the threadpool, then waits for a scoring worker, which
scores the requests queued at that moment as one batch (``gaikan.service.scoring``); the event loop
stays free. Every inspection is written to the log (SQLite in the data directory, or the database
``db`` names, e.g. a PostgreSQL shared by several replicas) and committed *before* the response is
sent (see :mod:`gaikan.service.store`).

Bad input answers with ``{"detail": "<one line>"}``: 401 missing/wrong API key, 404 unknown id or
model, 400 /v1/inspect while several models are served, 413 upload larger than
``max_upload_bytes`` or image larger than ``max_pixels``, 415 not an image, 422 a
truncated/corrupt/too-small image or a bad field, 503 (with ``Retry-After``) the log cannot take the
row now (locked, disk full, database down): nothing was logged, retry. See :mod:`gaikan.service.errors`.
"""

from __future__ import annotations

import ipaddress
import os
import time
import warnings
from io import BytesIO
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from pydantic import BaseModel

from gaikan.errors import GaikanError, ImageReadError
from gaikan.service.errors import install_error_handling

API_KEY_HEADER = "X-API-Key"
API_KEY_ENV = "GAIKAN_API_KEY"
#: a served model's name in a URL: the rule of gaikan.service.models.check_model_name (else 422)
ModelName = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                                     description="the name the model is served under (--model NAME=DIR)")]
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
STATIC_DIR = Path(__file__).parent / "static"
IMAGE_KINDS = ("image", "thumb", "heatmap", "overlay")
_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "BMP": "bmp", "TIFF": "tiff", "GIF": "gif",
                "WEBP": "webp"}


class SwapRequest(BaseModel):
    """Body of POST /v1/models/{name}/swap: the new version's model directory (on the server)."""

    model_dir: str


class UploadRefused(Exception):
    """A client upload we refuse: HTTP status + one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_auth_settings(api_key, no_auth: bool, host: str) -> None:
    """Refuse an open service: --no-auth only on a loopback host, otherwise a key is required."""
    if no_auth:
        if not is_loopback(host):
            raise GaikanError(f"--no-auth is only allowed on a loopback host (127.0.0.1, ::1, localhost), "
                              f"not {host}: give an API key with --api-key or {API_KEY_ENV}")
        return
    if not api_key:
        raise GaikanError(f"the service needs an API key: give --api-key or set {API_KEY_ENV} "
                          "(or --no-auth on a loopback host)")


def identify_upload(data: bytes, max_pixels: int, name: str = "upload") -> tuple[str, int, int]:
    """Header-only check of uploaded bytes -> (format key, width, height); raises UploadRefused."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UploadRefused(422, f"{name}: the uploaded file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(BytesIO(data)) as img:
                fmt, (width, height) = img.format, img.size
    except Image.DecompressionBombError as exc:
        raise UploadRefused(413, f"{name}: image too large ({' '.join(str(exc).split())})") from None
    except UnidentifiedImageError:
        raise UploadRefused(415, f"{name}: not an image file (send PNG, JPEG, BMP, TIFF, GIF or WebP)") from None
    except Exception as exc:  # noqa: BLE001 - a broken header is the client's problem
        raise UploadRefused(422, f"{name}: cannot read the image header ({' '.join(str(exc).split())})") from None
    if width * height > max_pixels:
        raise UploadRefused(413, f"{name}: image is {width}x{height} = {width * height} pixels, more than the "
                                 f"limit of {max_pixels}")
    if fmt not in _PIL_FORMATS:
        raise UploadRefused(415, f"{name}: {fmt} images are not accepted (send PNG, JPEG, BMP, TIFF, GIF or WebP)")
    return _PIL_FORMATS[fmt], width, height


FIGURE_MODES = ("lazy", "ng", "eager")


class InspectionService:
    """The served models + the log: what the HTTP layer calls. Usable without HTTP too.

    ``models``: a model directory (served as "default") or {name: directory}. ``figures``: ``lazy``
    (default) stores the anomaly map and draws thumb / heat map / overlay on the first request of
    their URL; ``ng`` stores maps only for NG parts (an OK part then has a thumbnail, no heat map);
    ``eager`` draws all three pictures for every upload before answering.
    """

    def __init__(self, models, data_dir, *, max_pixels: int = DEFAULT_MAX_PIXELS, runtime: str = "auto",
                 workers: int = 0, max_batch: int = 0, max_wait_ms: float = 2.0, figures: str = "lazy",
                 drift: dict | None = None, db: str | None = None):
        from gaikan.errors import SettingsError
        from gaikan.service.models import ModelRegistry, load_served_model
        from gaikan.service.monitor import ServiceMetrics
        from gaikan.service.store import InspectionStore

        if figures not in FIGURE_MODES:
            raise SettingsError(f"figures must be one of {', '.join(FIGURE_MODES)}, got {figures!r}")
        specs = models if isinstance(models, dict) else {"default": Path(models)}
        self.store = InspectionStore(data_dir, db=db)
        self.metrics = ServiceMetrics()
        self.max_pixels = int(max_pixels)
        self.figures = figures
        self._load_options = {"cache_dir": self.store.data_dir / "onnx", "runtime": runtime, "workers": workers,
                              "max_batch": max_batch, "max_wait_ms": max_wait_ms,
                              "drift_settings": {} if drift is None else dict(drift),
                              "on_batch": lambda name, n, ms: self.metrics.batch_size.labels(name).observe(n)}
        loaded = {}
        try:
            for name, path in specs.items():
                loaded[name] = load_served_model(name, path, **self._load_options)
        except BaseException:
            for served in loaded.values():
                served.batcher.close()
            raise
        self.registry = ModelRegistry(loaded)
        for served in loaded.values():
            self.metrics.set_model(served)

    # the first model's identity (the single-model service's /healthz and page)
    @property
    def default_model(self):
        return self.registry.all()[0]

    @property
    def model_id(self) -> str:
        return self.default_model.model_id

    @property
    def threshold(self) -> float:
        return self.default_model.threshold

    @property
    def threshold_method(self) -> str:
        return self.default_model.threshold_method

    def single_model_name(self) -> str | None:
        names = self.registry.names()
        return names[0] if len(names) == 1 else None

    def swap_model(self, name: str, model_dir) -> dict:
        """Serve ``model_dir`` under ``name`` from now on; requests under way finish on the old one."""
        from gaikan.service.models import load_served_model

        old, new = self.registry.swap(name, lambda: load_served_model(name, model_dir, **self._load_options))
        self.metrics.set_model(new)
        return {"previous": old.info(), "current": new.info()}

    def close(self) -> None:
        try:
            self.registry.close()
        finally:
            self.store.close()

    def _decode(self, data: bytes, name: str):
        from gaikan.data.inputs import read_input

        kind, width, height = identify_upload(data, self.max_pixels, name)
        try:  # the per-file rules of gaikan.data.inputs: decoding, bombs, too small, NaN, ...
            image = read_input(name, data=data, max_pixels=self.max_pixels)
        except ImageReadError as exc:
            problem = str(exc).split(": ", 1)[-1] if str(exc).startswith("cannot ") else str(exc)
            status = 413 if "more than the limit" in problem else 422
            raise UploadRefused(status, f"{name}: {problem}") from None
        return image, kind, width, height

    def inspect_bytes(self, data: bytes, *, part_id: str | None = None, name: str = "upload",
                      model: str | None = None) -> dict:
        """Decode, score (micro-batched), store and log one upload; returns the API's JSON dict.

        ``model``: the served name (None: the only model). The row is committed before returning."""
        if model is None:
            model = self.single_model_name()
            if model is None:
                raise UploadRefused(400, f"several models are served ({', '.join(self.registry.names())}): "
                                         "POST to /v1/models/{name}/inspect")
        try:
            lease = self.registry.lease(model)
            served = lease.__enter__()
        except KeyError:
            raise UploadRefused(404, f"no model named {model!r} (served: {', '.join(self.registry.names())})") \
                from None
        try:
            try:
                return self._inspect(served, data, part_id=part_id, name=name)
            except UploadRefused as exc:
                self.metrics.observe_refused(model, exc.status)
                raise
        finally:
            lease.__exit__(None, None, None)

    def _inspect(self, served, data: bytes, *, part_id, name) -> dict:
        from gaikan.service.render import inspection_pictures, map_npy_bytes

        t0 = time.perf_counter()
        served.batcher.announce()
        try:
            image, kind, width, height = self._decode(data, name)
            try:
                prepared = served.backend.prepare(image)
            except GaikanError as exc:  # the image's problem, not the service's
                raise UploadRefused(422, f"{name}: cannot score the image ({' '.join(str(exc).split())})") from None
        except BaseException:
            served.batcher.withdraw()
            raise
        t1 = time.perf_counter()
        future = served.batcher.submit(prepared, announced=True)
        try:
            result = future.result()
        except GaikanError as exc:
            raise UploadRefused(422, f"{name}: cannot score the image ({' '.join(str(exc).split())})") from None
        t2 = time.perf_counter()
        score = result.score
        verdict = "NG" if score > served.threshold else "OK"
        p_value = served.p_value(score)
        drift = None
        if served.drift is not None:
            drift = int(served.drift.update(score))
        amap = result.amap
        image_sha, image_ext = self.store.put_blob(data, kind)
        blobs, map_sha = {}, None
        if amap is not None and self.figures == "eager":
            blobs = {k: self.store.put_blob(v, "png")[0]
                     for k, v in inspection_pictures(image, amap, served.threshold).items()}
        elif amap is not None and (self.figures == "lazy" or verdict == "NG"):
            map_sha = self.store.put_blob(map_npy_bytes(amap), "npy")[0]
        t3 = time.perf_counter()
        timing = {"decode_ms": 1000 * (t1 - t0), "queue_ms": max(0.0, 1000 * (t2 - t1) - result.score_ms),
                  "score_ms": result.score_ms, "render_ms": 1000 * (t3 - t2)}
        row = self.store.add(
            part_id=part_id, image_sha256=image_sha, image_ext=image_ext, image_width=width, image_height=height,
            thumb_sha256=blobs.get("thumb"), heatmap_sha256=blobs.get("heatmap"),
            overlay_sha256=blobs.get("overlay"), score=score, verdict=verdict, threshold=served.threshold,
            threshold_method=served.threshold_method, p_value=p_value, model_id=served.model_id,
            model_checksum=served.model_checksum, timing_ms=1000 * (time.perf_counter() - t0),
            model_name=served.name, model_version=served.model_version, drift=drift, map_sha256=map_sha)
        self.metrics.observe_inspection(served.name, verdict, time.perf_counter() - t0,
                                        None if served.drift is None else served.drift.state())
        out = inspection_json(row)
        out["timing"] = {k: round(v, 2) for k, v in timing.items()} | {"total_ms": round(row.timing_ms, 2),
                                                                        "batch_size": result.batch_size}
        return out

    def blob_file(self, inspection_id: int, kind: str) -> tuple[Path, str] | None:
        """The stored picture of one inspection, drawn now (and stored) if it was not drawn yet."""
        from gaikan.service.store import MEDIA_TYPES

        row = self.store.get(inspection_id)
        if row is None:
            return None
        if kind != "image" and getattr(row, f"{kind}_sha256") is None:
            row = self._draw_pictures(row, kind)
            if row is None:
                return None
        sha, ext = {"image": (row.image_sha256, row.image_ext), "thumb": (row.thumb_sha256, ".png"),
                    "heatmap": (row.heatmap_sha256, ".png"), "overlay": (row.overlay_sha256, ".png")}[kind]
        if sha is None:
            return None
        path = self.store.blob_path(sha, ext)
        return (path, MEDIA_TYPES[ext]) if path.is_file() else None

    def _draw_pictures(self, row, kind: str):
        """Draw the pictures of a row logged without them (lazy figures); None when it has no map."""
        from gaikan.data.images import read_image
        from gaikan.service.render import inspection_pictures, read_map_npy

        if kind != "thumb" and row.map_sha256 is None:
            return None
        image_path = self.store.blob_path(row.image_sha256, row.image_ext)
        if not image_path.is_file():
            return None
        image = read_image(image_path, max_pixels=max(self.max_pixels, row.image_width * row.image_height))
        amap = None  # all the pictures the row can have are drawn at once (a page asks for them together)
        if row.map_sha256 is not None:
            map_path = self.store.blob_path(row.map_sha256, ".npy")
            if map_path.is_file():
                amap = read_map_npy(map_path.read_bytes())
            elif kind != "thumb":
                return None
        pictures = inspection_pictures(image, amap, row.threshold)
        digests = {k: self.store.put_blob(v, "png")[0] for k, v in pictures.items()}
        return self.store.set_pictures(row.id, **digests)


class UploadLimit:
    """Refuse a POST whose Content-Length exceeds ``limit`` + ``slack`` (the multipart framing) with
    413 before its body is read (the endpoint checks the file's actual size again, e.g. for chunked
    uploads).

    A plain ASGI middleware rather than Starlette's ``@app.middleware("http")``, which wraps every
    request in a task group and a streaming response (about a tenth of the event loop's samples in
    a py-spy profile under 8 clients; the throughput change was within the machine's noise)."""

    def __init__(self, app, limit: int, slack: int = 64 * 1024):
        self.app, self.limit, self.slack = app, int(limit), int(slack)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            for key, value in scope["headers"]:
                if key == b"content-length":
                    if value.isdigit() and int(value) > self.limit + self.slack:
                        response = JSONResponse({"detail": f"upload of {int(value)} bytes is larger than the "
                                                           f"limit of {self.limit} bytes"}, status_code=413)
                        await response(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)


def inspection_json(row) -> dict:
    d = row.to_dict()
    base = f"/v1/inspections/{row.id}"
    has_map = bool(row.heatmap_sha256 or row.map_sha256)
    d["links"] = {"self": base, "image": f"{base}/image", "thumb": f"{base}/thumb",
                  "heatmap": f"{base}/heatmap" if has_map else None,
                  "overlay": f"{base}/overlay" if has_map else None}
    return d


def create_app(model_dir, data_dir, api_key=None, *, no_auth: bool = False,
               host: str = "127.0.0.1", max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, runtime: str = "auto", workers: int = 0,
               max_batch: int = 0, max_wait_ms: float = 2.0, figures: str = "lazy", drift: dict | None = None,
               db: str | None = None):
    """Build the FastAPI app: loads the model(s) (once) and opens the log (``db``, else SQLite in ``data_dir``).

    ``model_dir``: one model directory (served as "default") or {name: directory}.
    ``api_key`` (else env GAIKAN_API_KEY) is required unless ``no_auth`` and ``host`` is loopback: a
    key, ``NAME=KEY``, a list of those, or a {name: key} dict (:mod:`gaikan.service.keys`).
    ``runtime``, ``workers``, ``max_batch``, ``max_wait_ms``: the scoring path
    (:mod:`gaikan.service.scoring`); ``figures``: when pictures are drawn (:class:`InspectionService`);
    ``drift``: :class:`gaikan.service.monitor.DriftMonitor` settings (window, min_count, level,
    expected_ng_rate).
    """
    from contextlib import asynccontextmanager

    from fastapi.responses import Response

    from gaikan.service.dashboard import dashboard_router
    from gaikan.service.keys import NO_AUTH_NAME, key_name, parse_api_keys

    api_keys = parse_api_keys(api_key or os.environ.get(API_KEY_ENV, "").split() or None)
    check_auth_settings(api_keys, no_auth, host)
    service = InspectionService(model_dir, data_dir, max_pixels=max_pixels, runtime=runtime, workers=workers,
                                max_batch=max_batch, max_wait_ms=max_wait_ms, figures=figures, drift=drift,
                                db=db)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        service.close()  # the scoring workers and the log's connection(s), e.g. a PostgreSQL pool

    app = FastAPI(title="gaikan inspection service", version=_version(), lifespan=lifespan,
                  description="OK/NG verdicts with heat maps from fitted gaikan models; every inspection "
                              "is logged (SQLite or PostgreSQL) before the answer is sent.")
    app.state.service = service

    async def require_key(request: Request) -> str:
        """The auth dependency: the name of the key the request sent (401 if none or unknown).

        async: it only reads a header and a dict, and a plain ``def`` dependency costs every request a
        hop through the thread pool."""
        if no_auth:
            return NO_AUTH_NAME
        given = request.headers.get(API_KEY_HEADER)
        if not given:
            raise HTTPException(401, f"missing API key: send it in the {API_KEY_HEADER} header")
        name = key_name(api_keys, given)
        if name is None:
            raise HTTPException(401, f"wrong API key in the {API_KEY_HEADER} header")
        return name

    app.add_middleware(UploadLimit, limit=max_upload_bytes)

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict:
        return {"status": "ok", "model_id": service.model_id, "threshold": service.threshold,
                "threshold_method": service.threshold_method, "auth": not no_auth,
                "models": {m.name: m.model_id for m in service.registry.all()}}

    async def _inspect(file: UploadFile, part_id: str | None, model: str | None) -> dict:
        data = await file.read(max_upload_bytes + 1)
        label = model or service.single_model_name()
        if label not in service.registry.names():  # metrics labels only for served names
            label = None
        if len(data) > max_upload_bytes:
            if label:
                service.metrics.observe_refused(label, 413)
            raise HTTPException(413, f"upload is larger than the limit of {max_upload_bytes} bytes")
        if part_id is not None and not part_id.isprintable():
            if label:
                service.metrics.observe_refused(label, 422)
            raise HTTPException(422, "part_id must be printable text")
        try:
            return await run_in_threadpool(service.inspect_bytes, data, part_id=part_id or None, name="upload",
                                           model=model)
        except UploadRefused as exc:
            raise HTTPException(exc.status, exc.message) from None

    @app.post("/v1/inspect", tags=["inspections"], dependencies=[Depends(require_key)],
              summary="Inspect one image with the only model: verdict, score, threshold, p-value, heat map")
    async def inspect(file: UploadFile, part_id: str | None = Form(None, max_length=200)) -> dict:
        return await _inspect(file, part_id, None)

    @app.post("/v1/models/{name}/inspect", tags=["inspections"], dependencies=[Depends(require_key)],
              summary="Inspect one image with the model served under {name}")
    async def inspect_with(name: ModelName, file: UploadFile, part_id: str | None = Form(None, max_length=200)) -> dict:
        return await _inspect(file, part_id, name)

    def _served(name: str):
        try:
            return service.registry.get(name)
        except KeyError:
            raise HTTPException(404, f"no model named {name!r} (served: {', '.join(service.registry.names())})") \
                from None

    @app.get("/v1/models", tags=["models"], dependencies=[Depends(require_key)])
    def list_models() -> dict:
        return {"models": [m.info() for m in service.registry.all()]}

    @app.get("/v1/models/{name}", tags=["models"], dependencies=[Depends(require_key)])
    def get_model(name: ModelName) -> dict:
        return _served(name).info()

    @app.post("/v1/models/{name}/swap", tags=["models"], dependencies=[Depends(require_key)],
              summary="Serve a new model version under {name}; requests under way finish on the old one")
    async def swap_model(name: ModelName, body: SwapRequest) -> dict:
        _served(name)
        try:
            return await run_in_threadpool(service.swap_model, name, body.model_dir)
        except GaikanError as exc:
            raise HTTPException(422, f"model {body.model_dir}: {' '.join(str(exc).split())}") from None

    def _drift_json(served) -> dict:
        state = None if served.drift is None else served.drift.state()
        return {"name": served.name, "model_id": served.model_id, "model_version": served.model_version,
                "monitored": state is not None, "drift": bool(state and state["drift"]), "state": state}

    @app.get("/v1/drift", tags=["monitoring"], dependencies=[Depends(require_key)],
             summary="The drift flag of every model (goods' conformal p-values no longer uniform)")
    def drift_all() -> dict:
        models = {m.name: _drift_json(m) for m in service.registry.all()}
        return {"drift": any(m["drift"] for m in models.values()), "models": models}

    @app.get("/v1/models/{name}/drift", tags=["monitoring"], dependencies=[Depends(require_key)])
    def drift_one(name: ModelName) -> dict:
        return _drift_json(_served(name))

    @app.get("/metrics", tags=["monitoring"], response_class=Response,
             summary="Prometheus metrics (text exposition format; aggregate counts only, no key needed)")
    def metrics():
        body, content_type = service.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/inspections", tags=["inspections"], dependencies=[Depends(require_key)])
    def list_inspections(
        verdict: Literal["OK", "NG"] | None = None,
        since: float | None = Query(None, description="unix time (s): only inspections at or after it"),
        until: float | None = Query(None, description="unix time (s): only inspections before it"),
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0),
        order: Literal["newest", "ng_first"] = "newest",
    ) -> dict:
        rows, total = service.store.query(verdict=verdict, since=since, until=until, limit=limit, offset=offset,
                                          ng_first=order == "ng_first")
        return {"items": [inspection_json(r) for r in rows], "total": total, "limit": limit, "offset": offset}

    @app.get("/v1/inspections/{inspection_id}", tags=["inspections"], dependencies=[Depends(require_key)])
    def get_inspection(inspection_id: int) -> dict:
        row = service.store.get(inspection_id)
        if row is None:
            raise HTTPException(404, f"no inspection with id {inspection_id}")
        return inspection_json(row)

    @app.get("/v1/inspections/{inspection_id}/{kind}", tags=["inspections"], dependencies=[Depends(require_key)],
             response_class=FileResponse)
    def get_inspection_image(inspection_id: int, kind: Literal["image", "thumb", "heatmap", "overlay"]):
        found = service.blob_file(inspection_id, kind)
        if found is None:
            raise HTTPException(404, f"no {kind} for inspection {inspection_id}")
        path, media_type = found
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=86400"})

    dashboard_router(service, require_key, router=app.router)  # plain app routes: errors.py documents them

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    install_error_handling(app)  # 503 + Retry-After when the log is unavailable; error codes in the schema
    return app


def _version() -> str:
    import gaikan

    return gaikan.__version__
