"""How the service answers when something is wrong, and where that is documented.

* :class:`gaikan.service.store.LogUnavailable`: the inspection log or the blob store cannot take or
  give a row right now (SQLite "database is locked" past the busy timeout, "database or disk is
  full", an I/O error, PostgreSQL down or out of connections, a full disk while storing the upload).
  Every log store backend raises it; the service answers
  **503** with a ``Retry-After`` header (seconds) and ``{"detail": "..."}``. Nothing was logged for
  that request, so nothing acknowledged is lost: the client retries.
* :func:`install_error_handling` (called once by ``create_app``) registers that 503 handler and
  documents every status code the routes can answer in the OpenAPI schema (what the schemathesis
  tests hold the service to):

  ====================================  ==========================================================
  routes                                documented errors
  ====================================  ==========================================================
  every ``/v1/...`` route               401 missing or wrong API key, 503 log unavailable
  routes with a path parameter          404 unknown id / no such picture
  routes with a body                    400 malformed body (e.g. invalid multipart data)
  POST routes with a body               413 too large, 415 not an image (or an unaccepted format)
  routes with parameters or a body      422 a bad field (FastAPI's list of errors) or a corrupt,
                                        truncated or unusable image (one line)
  ====================================  ==========================================================

Every error body is ``{"detail": "<one line>"}`` (FastAPI's own 422 has a list there).
"""

from __future__ import annotations

from gaikan.service.store import RETRY_AFTER_S, LogUnavailable

__all__ = ["RETRY_AFTER_S", "LogUnavailable", "documented_errors", "install_error_handling"]

_ERROR_BODY = {"application/json": {"schema": {
    "type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}}}
_VALIDATION_BODY = {"application/json": {"schema": {
    "type": "object", "required": ["detail"],
    "properties": {"detail": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]}}}}}


def _response(description: str, body=_ERROR_BODY, headers: dict | None = None) -> dict:
    out = {"description": description, "content": body}
    if headers:
        out["headers"] = headers
    return out


def documented_errors(path: str, method: str, has_params: bool, has_body: bool) -> dict:
    """The error responses of one route (see the module docstring for the rules)."""
    responses: dict = {}
    if path.startswith("/v1/"):
        responses[401] = _response("Missing or wrong API key (X-API-Key header)")
        responses[503] = _response(
            "The inspection log is unavailable (locked, full, I/O error); nothing was logged: retry after "
            "Retry-After seconds",
            headers={"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                                     "schema": {"type": "integer", "minimum": 0}}})
    if "{" in path:
        responses[404] = _response("No such inspection or picture")
    if has_body:
        responses[400] = _response("Malformed request body (e.g. invalid multipart data)")
    if method == "POST" and has_body:
        responses[413] = _response("Upload or image larger than the service's limits")
        responses[415] = _response("Not an image, or an image format the service does not accept")
    if has_params or has_body:
        responses[422] = _response("A bad field, or a corrupt, truncated or unusable image", body=_VALIDATION_BODY)
    return responses


def install_error_handling(app) -> None:
    """Register the 503 handler and document the error responses of every API route of ``app``."""
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute

    async def store_unavailable(request, exc: LogUnavailable):
        return JSONResponse({"detail": " ".join(str(exc).split())}, status_code=503,
                            headers={"Retry-After": str(exc.retry_after)})

    app.add_exception_handler(LogUnavailable, store_unavailable)
    for route in app.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        params = route.dependant
        has_params = bool(params.path_params or params.query_params or params.header_params
                          or params.cookie_params)
        has_body = route.body_field is not None
        for method in route.methods or ():
            for code, response in documented_errors(route.path, method, has_params, has_body).items():
                route.responses.setdefault(code, response)
    app.openapi_schema = None  # regenerate with the new responses
