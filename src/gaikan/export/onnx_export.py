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

Two-stage graphs: a scoring module with ``embed(image)`` and ``score_embedding(embedding)`` (PaDiM,
whose head is memory-bound) is traced as two graphs joined at the tensor ``embedding``, and the
metadata says ``stage_cut`` = "embedding". The file is still one graph from ``image`` to the two
outputs, read as before; ``split_stages`` cuts it in two for a scorer that batches the head apart
from the features (``gaikan serve``). Same operations as one trace, so the same scores.

The traced graph is cleaned before it is written (``gaikan.export.graph``: onnxruntime's basic
optimisation, i.e. constant folding, then the TensorFlow "SAME" Pads folded into their convolutions).

Exporter: torch's TorchScript-based ``torch.onnx.export(..., dynamo=False)``; the dynamo exporter
needs the onnxscript package, which we do not depend on.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

import gaikan
from gaikan.errors import GaikanError, ModelFormatError, SettingsError
from gaikan.export.graph import clean_graph, save_atomic

FORMAT_NAME = "gaikan-onnx"
FORMAT_VERSION = 1
OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "anomaly_map")
#: the tensor joining a two-stage graph's feature stage to its head (PaDiM: the (N, P, d) embeddings)
STAGE_CUT = "embedding"
#: the prefix of the head stage's node names in a two-stage graph (``_join``)
HEAD_STAGE_PREFIX = "head"
#: the exporter's revision, for caches of exported files (``gaikan serve``): raised when the graphs
#: it writes change in layout though the format stays readable (2: PaDiM's stage cut; 3: the map's
#: upsampling and smoothing as two matrix products, ``gaikan.detectors.maps.smooth_map``)
EXPORT_REVISION = 3
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
                            "scoring_module(): padim, patchcore, patch-metric)")
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
    staged = hasattr(module, "score_embedding")  # two stages joined at a named tensor (see STAGE_CUT)
    if staged:
        with torch.no_grad():
            emb = module.embed(dummy)
        first = _trace(_stage(module, "embed"), dummy, INPUT_NAME, [STAGE_CUT], opset)
        second = _trace(_stage(module, "score_embedding"), emb, STAGE_CUT, list(OUTPUT_NAMES), opset)
        model = _join(first, second)
    else:
        model = _trace(module, dummy, INPUT_NAME, list(OUTPUT_NAMES), opset)
    model.doc_string = f"gaikan {detector.name}: image (N,3,{height},{width}) in [0,1] -> score (N,), anomaly_map (N,{height},{width})"
    metadata = model_metadata(detector)
    if staged:
        metadata["stage_cut"] = STAGE_CUT
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return save_atomic(model, out)


def _stage(owner, method: str):
    """``owner.method`` as a module of its own, for the tracer. It holds the owner's submodules under
    their own names, so their nodes are named as in a trace of the owner (``/extractor/...``:
    ``gaikan.export.quantize`` finds the backbone by that name); the owner's buffers become constants."""
    import torch

    class Stage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, child in owner.named_children():
                self.add_module(name, child)

        def forward(self, x):
            return getattr(owner, method)(x)

    return Stage().eval()


def _trace(module, dummy, input_name: str, output_names: list[str], opset: int):
    """One torch module -> a cleaned ONNX model, the batch axis dynamic."""
    import onnx
    import torch

    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns about shapes turned into constants: intended, the working size is fixed
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (dummy,), buffer, dynamo=False, opset_version=opset,
            input_names=[input_name], output_names=output_names,
            dynamic_axes={name: {0: "N"} for name in [input_name, *output_names]},
            do_constant_folding=True,
        )
    return clean_graph(onnx.load_from_string(buffer.getvalue()))


def _join(first, second):
    """The two stages as one graph, joined at STAGE_CUT (their tensors, and the head's nodes,
    prefixed apart: the two traces name them alike)."""
    import onnx.compose
    import onnx.helper

    keep = {"rename_inputs": False, "rename_outputs": False}
    first = onnx.compose.add_prefix(first, "features/", rename_nodes=False, **keep)  # /extractor/... kept
    second = onnx.compose.add_prefix(second, HEAD_STAGE_PREFIX, **keep)  # head/Sub, ...
    model = onnx.compose.merge_models(first, second, io_map=[(STAGE_CUT, STAGE_CUT)],
                                      producer_name="gaikan", producer_version=gaikan.__version__)
    opsets = {op.domain: op.version for op in model.opset_import}  # merge lists each domain twice
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items())
    return model


class Stages(NamedTuple):
    """A two-stage graph cut at STAGE_CUT: serialised ONNX models and the file's metadata."""

    features: bytes  # image -> embedding
    head: bytes  # embedding -> score, anomaly_map
    metadata: dict[str, str]


def split_stages(path) -> Stages | None:
    """An exported model's two stages as separate ONNX models, or None for a one-stage graph."""
    import onnx
    import onnx.utils

    model = onnx.load(str(path))
    metadata = {p.key: p.value for p in model.metadata_props}
    if metadata.get("stage_cut") != STAGE_CUT:
        return None
    extractor = onnx.utils.Extractor(model)
    first = extractor.extract_model([INPUT_NAME], [STAGE_CUT])
    second = extractor.extract_model([STAGE_CUT], list(OUTPUT_NAMES))
    return Stages(first.SerializeToString(), second.SerializeToString(), metadata)


def read_metadata(path) -> dict[str, str]:
    """The metadata_props of an exported model (for inspection; scorers use gaikan.edge)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such ONNX file")
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}
