"""schemathesis against the service's own OpenAPI schema (bounded examples, derandomized): for every
operation, generated requests - valid and invalid parameters, random uploads and real images of
random sizes and formats (including too small and unaccepted ones) - never get a 5xx, and every answer
has a status code the schema documents for that operation, with the documented body and headers."""

import io
import os

import numpy as np
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                               response_schema_conformance, status_code_conformance)
from schemathesis.checks import not_a_server_error

from gaikan.service.app import create_app

KEY = "fuzz-key-0123456789"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def _image_bytes(args) -> bytes:
    fmt, h, w, channels, seed = args
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w) if channels == 1 else (h, w, channels), dtype=np.uint8)
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if fmt in ("JPEG", "BMP", "GIF") and img.mode == "RGBA":
        img = img.convert("RGB")
    img.save(buf, format=fmt)
    return buf.getvalue()


# uploads: real images (PNG/JPEG/BMP/TIFF/GIF/WebP/ICO; some under 8x8, some long and thin), truncated
# images and random bytes
side = st.one_of(st.integers(8, 60), st.integers(1, 96))
images = st.tuples(st.sampled_from(["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "ICO"]), side, side,
                   st.sampled_from([1, 3, 4]), st.integers(0, 2**31)).map(_image_bytes)
uploads = st.one_of(images, images, images.flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),
                    st.binary(max_size=512))


@pytest.fixture
def api_schema(service_model, tmp_path_factory):
    # one app per test: schemathesis' pytest plugin ends an ASGI app's lifespan at each test's teardown,
    # and the service closes its models and log there (issue 9's lifespan, issue 10pg's pool)
    app = create_app(service_model, tmp_path_factory.mktemp("fuzz-log"), KEY, max_upload_bytes=200_000,
                     max_pixels=6000)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


FUZZ = settings(max_examples=int(os.environ.get("GAIKAN_FUZZ_EXAMPLES", "0") or 0) or 20, derandomize=True, database=None, deadline=None,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_error_and_only_documented_answers(api_schema, mode):
    """Every operation of the schema (new routes included, with no change here), valid and invalid
    requests. (schemathesis' own pytest loader does not run under this pytest, so hypothesis drives
    each operation's strategy directly.)"""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 5
    if mode == GenerationMode.NEGATIVE:  # an operation without parameters or body has no invalid request
        operations = [op for op in operations if op.path_parameters or op.query or op.body or op.headers]
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        @FUZZ
        @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
        def run(case, data):
            # the schema says only "a string" for the file (FastAPI's contentMediaType is not used by
            # schemathesis): three uploads in four are replaced by images, truncated images or random bytes
            if isinstance(case.body, dict) and "file" in case.body and data.draw(st.integers(0, 3)) > 0:
                case.body["file"] = data.draw(uploads)
            response = case.call_and_validate(headers={"X-API-Key": KEY}, checks=CHECKS, timeout=300)
            statuses.setdefault(operation.label, set()).add(response.status_code)

        run()
    # the fuzz reached the scoring path and the refusals, not only the validation layer
    if mode == GenerationMode.POSITIVE:
        assert 200 in statuses["POST /v1/inspect"] and {413, 415, 422} & statuses["POST /v1/inspect"], statuses
    assert all(code < 500 for codes in statuses.values() for code in codes), statuses


def test_the_schema_documents_the_error_codes(service_model, tmp_path):
    from fastapi.testclient import TestClient

    app = create_app(service_model, tmp_path / "log", KEY)
    paths = TestClient(app).get("/openapi.json").json()["paths"]
    inspect = paths["/v1/inspect"]["post"]["responses"]
    assert {"200", "400", "401", "413", "415", "422", "503"} <= set(inspect)
    assert inspect["503"]["headers"]["Retry-After"]["required"] is True
    assert {"401", "404", "503"} <= set(paths["/v1/inspections/{inspection_id}"]["get"]["responses"])
    assert set(paths["/healthz"]["get"]["responses"]) == {"200"}


@pytest.mark.parametrize("shape, status, fragment", [((2, 2000), 422, "too small"), ((4, 4, 3), 422, "too small"),
                                                     ((100, 100), 413, "more than the limit")])
def test_a_readable_but_unusable_image_is_a_4xx_naming_the_problem(service_model, tmp_path, shape, status, fragment):
    from fastapi.testclient import TestClient

    buf = io.BytesIO()
    Image.fromarray(np.full(shape, 128, np.uint8)).save(buf, format="PNG")
    with TestClient(create_app(service_model, tmp_path / "log", KEY, max_pixels=6000)) as client:
        r = client.post("/v1/inspect", files={"file": ("x.png", buf.getvalue(), "image/png")},
                        headers={"X-API-Key": KEY})
        assert r.status_code == status and fragment in r.json()["detail"], r.text
        assert client.get("/v1/inspections", headers={"X-API-Key": KEY}).json()["total"] == 0
