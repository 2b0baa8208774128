"""A small fitted PaDiM (64 px, conformal threshold at alpha = 0.1) and PNG uploads for the service tests."""

import io

import numpy as np
import pytest
from PIL import Image

ALPHA = 0.1


def png(arr) -> bytes:
    buf = io.BytesIO()
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def service_split():
    from gaikan.data.synthetic import make_defect_dataset

    return make_defect_dataset(60, 8, 8, size=64, seed=5)


@pytest.fixture(scope="session")
def service_model(service_split, tmp_path_factory):
    from gaikan.detectors.padim import PaDiM

    det = PaDiM(image_size=64, n_features=30)
    det.fit(service_split.train.images, validation_fraction=0.2, threshold_method="conformal",
            false_alarm_rate=ALPHA)
    path = tmp_path_factory.mktemp("service_model") / "padim"
    det.save(path)
    return path


@pytest.fixture(scope="session")
def uploads(service_split):
    """PNG bytes: 'good' (test goods) and 'defect' (injected defects), in the split's order."""
    test = service_split.test
    return {"good": [png(img) for img, y in zip(test.images, test.labels) if y == 0],
            "defect": [png(img) for img, y in zip(test.images, test.labels) if y == 1]}


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (Debian package binaries) in a temp dir for the session; skipped with
    the reason when the binaries or psycopg are absent (`make test` installs both)."""
    from gaikan.service.pgtemp import TempPostgres, missing_reason

    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    with TempPostgres(settings={"fsync": "off"}) as pg:  # throwaway server: no need to sync its files
        yield pg


@pytest.fixture
def pg_url(postgres, request):
    """A fresh, empty database on the session's server (one per test)."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40] + "_" + uuid.uuid4().hex[:8]
    return postgres.create_database(name)
