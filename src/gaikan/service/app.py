"""The HTTP inspection service (FastAPI): ``create_app(model_dir, data_dir, api_key, ...)``.

Endpoints (OpenAPI docs at ``/docs``, schema at ``/openapi.json``)::

    POST /v1/inspect                     multipart: file (the image), part_id (optional) -> verdict
    GET  /v1/inspections                 paged log; ?verdict=OK|NG&since=&until=&limit=&offset=&order=
    GET  /v1/inspections/{id}            one inspection
    GET  /v1/inspections/{id}/{kind}     its stored image: image | thumb | heatmap | overlay
    GET  /healthz                        liveness + model id (no key needed)
    GET  /                               the web page (static files, no key needed; the page asks for it)

The model is loaded once, at start-up. Scoring runs in the threadpool under a lock (the detector's
torch state is not re-entrant), so the event loop stays free. Every inspection is written to the
SQLite log and committed *before* the response is sent (see :mod:`gaikan.service.store`).

Bad input answers with ``{"detail": "<one line>"}``: 401 missing/wrong API key, 404 unknown id,
413 upload larger than ``max_upload_bytes`` or image larger than ``max_pixels``, 415 not an image,
422 a truncated/corrupt/too-small image or a bad field, 503 (with ``Retry-After``) the log cannot take
the row now (locked, disk full): nothing was logged, retry. See :mod:`gaikan.service.errors`.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import threading
import time
import warnings
from io import BytesIO
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from gaikan.errors import GaikanError, ImageReadError
from gaikan.service.errors import install_error_handling

API_KEY_HEADER = "X-API-Key"
API_KEY_ENV = "GAIKAN_API_KEY"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
STATIC_DIR = Path(__file__).parent / "static"
IMAGE_KINDS = ("image", "thumb", "heatmap", "overlay")
_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "BMP": "bmp", "TIFF": "tiff", "GIF": "gif",
                "WEBP": "webp"}


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


def check_auth_settings(api_key: str | None, no_auth: bool, host: str) -> None:
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


class InspectionService:
    """The loaded model + the log: what the HTTP layer calls. Usable without HTTP too."""

    def __init__(self, model_dir, data_dir, *, max_pixels: int = DEFAULT_MAX_PIXELS):
        from gaikan.detectors.base import load_detector
        from gaikan.io.model_io import model_id
        from gaikan.service.store import InspectionStore

        self.detector = load_detector(model_dir)
        manifest = self.detector.manifest_
        self.model_dir = Path(model_dir)
        self.model_id = model_id(manifest)
        self.model_checksum = manifest["tensors"]["sha256"]
        self.threshold = float(self.detector.threshold)
        self.threshold_method = self.detector.thresholds.default_method
        self.store = InspectionStore(data_dir)
        self.max_pixels = int(max_pixels)
        self._score_lock = threading.Lock()

    def inspect_bytes(self, data: bytes, *, part_id: str | None = None, name: str = "upload") -> dict:
        """Decode, score, render, store and log one upload; returns the API's JSON dict."""
        from gaikan.data.inputs import read_input
        from gaikan.service.store import BLOB_EXTENSIONS, unavailable_on_errors
        from gaikan.service.render import inspection_pictures

        t0 = time.perf_counter()
        kind, width, height = identify_upload(data, self.max_pixels, name)
        tmp = self.store.temp_path(BLOB_EXTENSIONS[kind])
        try:
            with unavailable_on_errors("nothing was logged"):
                tmp.write_bytes(data)
            try:  # the per-file rules of gaikan.data.inputs: decoding, bombs, too small, NaN, ...
                image = read_input(tmp, max_pixels=self.max_pixels)
            except ImageReadError as exc:
                problem = str(exc).split(": ", 1)[-1] if str(exc).startswith("cannot ") else str(exc)
                status = 413 if "more than the limit" in problem else 422
                raise UploadRefused(status, f"{name}: {problem}") from None
        finally:
            tmp.unlink(missing_ok=True)
        t1 = time.perf_counter()
        with self._score_lock:
            t_locked = time.perf_counter()
            try:
                result = self.detector.score([image])
            except GaikanError as exc:  # the image's problem, not the service's
                raise UploadRefused(422, f"{name}: cannot score the image ({' '.join(str(exc).split())})") from None
            p_values = self.detector.p_values(result.scores)
        t2 = time.perf_counter()
        score = float(result.scores[0])
        verdict = "NG" if score > self.threshold else "OK"
        p_value = None if p_values is None else float(p_values[0])
        amap = None if result.maps is None else np.asarray(result.maps[0], dtype=np.float32)
        pictures = inspection_pictures(image, amap, self.threshold)
        image_sha, image_ext = self.store.put_blob(data, kind)
        blobs = {k: self.store.put_blob(v, "png")[0] for k, v in pictures.items()}
        t3 = time.perf_counter()
        timing = {"decode_ms": 1000 * (t1 - t0), "queue_ms": 1000 * (t_locked - t1),
                  "score_ms": 1000 * (t2 - t_locked), "render_ms": 1000 * (t3 - t2)}
        row = self.store.add(
            part_id=part_id, image_sha256=image_sha, image_ext=image_ext, image_width=width, image_height=height,
            thumb_sha256=blobs.get("thumb"), heatmap_sha256=blobs.get("heatmap"),
            overlay_sha256=blobs.get("overlay"), score=score, verdict=verdict, threshold=self.threshold,
            threshold_method=self.threshold_method, p_value=p_value, model_id=self.model_id,
            model_checksum=self.model_checksum, timing_ms=1000 * (time.perf_counter() - t0))
        out = inspection_json(row)
        out["timing"] = {k: round(v, 2) for k, v in timing.items()} | {"total_ms": round(row.timing_ms, 2)}
        return out

    def blob_file(self, inspection_id: int, kind: str) -> tuple[Path, str] | None:
        from gaikan.service.store import MEDIA_TYPES

        row = self.store.get(inspection_id)
        if row is None:
            return None
        sha, ext = {"image": (row.image_sha256, row.image_ext), "thumb": (row.thumb_sha256, ".png"),
                    "heatmap": (row.heatmap_sha256, ".png"), "overlay": (row.overlay_sha256, ".png")}[kind]
        if sha is None:
            return None
        path = self.store.blob_path(sha, ext)
        return (path, MEDIA_TYPES[ext]) if path.is_file() else None


def inspection_json(row) -> dict:
    d = row.to_dict()
    base = f"/v1/inspections/{row.id}"
    d["links"] = {"self": base, "image": f"{base}/image", "thumb": f"{base}/thumb",
                  "heatmap": f"{base}/heatmap" if row.heatmap_sha256 else None,
                  "overlay": f"{base}/overlay" if row.overlay_sha256 else None}
    return d


def create_app(model_dir, data_dir, api_key: str | None = None, *, no_auth: bool = False,
               host: str = "127.0.0.1", max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS):
    """Build the FastAPI app: loads the model (once) and opens the log in ``data_dir``.

    ``api_key`` (else env GAIKAN_API_KEY) is required unless ``no_auth`` and ``host`` is loopback.
    """
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    check_auth_settings(api_key, no_auth, host)
    service = InspectionService(model_dir, data_dir, max_pixels=max_pixels)

    app = FastAPI(title="gaikan inspection service", version=_version(),
                  description="OK/NG verdicts with heat maps from a fitted gaikan model; every inspection "
                              "is logged in SQLite before the answer is sent.")
    app.state.service = service

    def require_key(request: Request) -> None:
        if no_auth:
            return
        given = request.headers.get(API_KEY_HEADER)
        if not given:
            raise HTTPException(401, f"missing API key: send it in the {API_KEY_HEADER} header")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, f"wrong API key in the {API_KEY_HEADER} header")

    @app.middleware("http")
    async def limit_upload_size(request: Request, call_next):
        # refuse big bodies before they are parsed and spooled (Content-Length); the endpoint checks
        # the actual size again for chunked uploads
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > max_upload_bytes + 64 * 1024:
                return JSONResponse({"detail": f"upload of {int(length)} bytes is larger than the limit of "
                                               f"{max_upload_bytes} bytes"}, status_code=413)
        return await call_next(request)

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict:
        return {"status": "ok", "model_id": service.model_id, "threshold": service.threshold,
                "threshold_method": service.threshold_method, "auth": not no_auth}

    @app.post("/v1/inspect", tags=["inspections"], dependencies=[Depends(require_key)],
              summary="Inspect one image: verdict, score, threshold, p-value, heat map")
    async def inspect(file: UploadFile, part_id: str | None = Form(None, max_length=200)) -> dict:
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"upload is larger than the limit of {max_upload_bytes} bytes")
        if part_id is not None and not part_id.isprintable():
            raise HTTPException(422, "part_id must be printable text")
        try:
            return await run_in_threadpool(service.inspect_bytes, data, part_id=part_id or None, name="upload")
        except UploadRefused as exc:
            raise HTTPException(exc.status, exc.message) from None

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

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    install_error_handling(app)  # 503 + Retry-After when the log is unavailable; error codes in the schema
    return app


def _version() -> str:
    import gaikan

    return gaikan.__version__
