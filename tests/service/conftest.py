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
