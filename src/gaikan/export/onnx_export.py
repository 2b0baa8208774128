"""One ONNX file holding a fitted detector's whole scoring path (``gaikan export``).

The graph (built from ``detector.scoring_module()``, see gaikan.detectors.scoring):

    input  ``image``        float32 (N, 3, H, W), RGB in [0, 1], already at the working size (H, W)
    output ``score``        float32 (N,)       image scores, higher = more defective
    output ``anomaly_map``  float32 (N, H, W)  anomaly maps at the working size

N is dynamic. The input is float, not uint8: the torch path resizes in float (Pillow mode "F", no
8-bit rounding), and a uint8 input would round the resized image. Reading, resizing and gray -> RGB
happen outside the graph with Pillow/numpy (``gaikan.edge.prepare_image``), exactly as in
``gaikan.backbones.features.prepare_image``.

The model's ``metadata_props`` carry everything a scorer needs besides the graph (all strings; JSON
where structured): ``gaikan_format`` ("gaikan-onnx"), ``gaikan_format_version``, ``gaikan_version``,
``detector``, ``settings``, ``input_size`` ([H, W]), ``input_format``, ``threshold`` (the model's
default), ``threshold_method``, ``thresholds`` (every method's value), ``calibration_scores`` (the
held-out good scores, for conformal p-values) and ``fit``.

Exporter: torch's TorchScript-based ``torch.onnx.export(..., dynamo=False)``; the dynamo exporter
needs the onnxscript package, which we do not depend on.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

import gaikan
from gaikan.errors import GaikanError, ModelFormatError, SettingsError

FORMAT_NAME = "gaikan-onnx"
FORMAT_VERSION = 1
OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "anomaly_map")
INPUT_FORMAT = "float32 NCHW RGB in [0, 1] at input_size (resized with Pillow bilinear, mode F)"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def model_metadata(detector) -> dict[str, str]:
    """The metadata_props written into the ONNX model (strings only)."""
    thresholds = detector.thresholds
    calibration = getattr(detector, "calibration_scores_", None)
    return {
        "gaikan_format": FORMAT_NAME,
        "gaikan_format_version": str(FORMAT_VERSION),
        "gaikan_version": gaikan.__version__,
        "detector": detector.name,
        "settings": json.dumps(_jsonable(detector.settings())),
        "input_size": json.dumps(list(detector.input_size)),
        "input_format": INPUT_FORMAT,
        "threshold": repr(float(detector.threshold)),
        "threshold_method": thresholds.default_method,
        "thresholds": json.dumps({k: float(v) for k, v in thresholds.values.items()}),
        "calibration_scores": json.dumps([] if calibration is None else [float(s) for s in calibration]),
        "fit": json.dumps(_jsonable(getattr(detector, "fit_info_", {}))),
    }


def scoring_module(detector):
    """The detector's scoring path as a torch module, or a clear error when it has none."""
    detector._check_fitted()
    make = getattr(detector, "scoring_module", None)
    if make is None:
        raise SettingsError(f"{detector.name} cannot be exported to ONNX (only detectors with a "
                            "scoring_module(): padim, patchcore)")
    if int(getattr(detector, "tile_size", 0) or 0):
        raise SettingsError(f"this {detector.name} model scores large images by tiling (tile_size="
                            f"{detector.tile_size}); the ONNX graph covers one image of the working size: "
                            "refit with tile_size=0 to export")
    return make()


def export_onnx(detector, out, *, force: bool = False, opset: int = OPSET) -> Path:
    """Write ``detector`` (a fitted Detector, or the path of a saved model directory) as one ONNX file.

    An existing ``out`` is refused unless ``force``; the file is written to a temporary sibling and
    renamed, so a failed export never leaves a half-written model behind.
    """
    import onnx
    import torch

    if isinstance(detector, (str, os.PathLike)):
        from gaikan.io.model_io import load_detector

        detector = load_detector(detector)
    out = Path(out)
    if out.exists() and not force:
        raise GaikanError(f"{out} already exists; use --force to replace it")
    if out.exists() and not out.is_file():
        raise GaikanError(f"{out} exists and is not a file")
    module = scoring_module(detector)
    height, width = detector.input_size
    dummy = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about shapes turned into constants: intended, the working size is fixed
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (dummy,), buffer, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAMES[0]: {0: "N"}, OUTPUT_NAMES[1]: {0: "N"}},
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buffer.getvalue())
    del buffer
    model.doc_string = f"gaikan {detector.name}: image (N,3,{height},{width}) in [0,1] -> score (N,), anomaly_map (N,{height},{width})"
    for key, value in model_metadata(detector).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        onnx.save_model(model, tmp)
        os.replace(tmp, out)
    except OSError as exc:  # a full disk: clear error, the previous file (if any) untouched
        from gaikan.io.atomic import describe_os_error

        Path(tmp).unlink(missing_ok=True)
        kept = "the previous file is unchanged" if out.exists() else "nothing was written"
        raise GaikanError(f"cannot write the ONNX model {out}: {describe_os_error(exc)}; {kept}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def read_metadata(path) -> dict[str, str]:
    """The metadata_props of an exported model (for inspection; scorers use gaikan.edge)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such ONNX file")
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}
