"""Graph clean-up applied to every exported model before it is written (float and int8 alike).

1. onnxruntime's *basic* graph optimisation (``ORT_ENABLE_BASIC``): constant folding and redundant
   node elimination, rewrites that keep standard ONNX operators and hold for every runtime (no
   CPU-specific fusions, no layout changes); it turns the exporter's shape arithmetic of the
   TensorFlow "SAME" paddings into constant ``pads``.
2. Each zero-constant ``Pad`` of the spatial axes that feeds only convolutions is folded into those
   convolutions' ``pads`` attribute: ``Conv(Pad(x, p)) == Conv(x, pads=p)`` exactly (zero padding is
   what Conv's own padding does). EfficientNet-Lite0's stride-2 convolutions pad asymmetrically
   (bottom/right), which Conv's ``pads`` = [top, left, bottom, right] expresses. Without the fold the
   12 Pad nodes copy every stride-2 input once more (a sixth of the backbone's time at 224 px on
   onnxruntime) and, in an int8 model, sit between a DequantizeLinear and its convolution so that
   the convolution cannot run on int8 data.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np


def optimise_basic(model):
    """``model`` (onnx.ModelProto) after onnxruntime's basic optimisation (a new ModelProto)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="gaikan-onnx-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save_model(model, str(src))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(dst)
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
        out = onnx.load(str(dst))
    out.doc_string = model.doc_string
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _set_ints(node, name, values) -> None:
    from onnx import helper

    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, [int(v) for v in values]))


def fold_pads_into_convs(model) -> int:
    """Fold zero-constant spatial Pads into the Conv nodes they feed (in place); returns how many."""
    from onnx import numpy_helper

    init = {i.name: i for i in model.graph.initializer}
    consumers = defaultdict(list)
    for n in model.graph.node:
        for name in n.input:
            consumers[name].append(n)
    graph_outputs = {o.name for o in model.graph.output}
    folded = []
    for pad in model.graph.node:
        if pad.op_type != "Pad" or (_attr(pad, "mode", b"constant") not in (b"constant", "constant")):
            continue
        if len(pad.input) < 2 or pad.input[1] not in init:
            continue
        if len(pad.input) > 2 and pad.input[2]:
            if pad.input[2] not in init or np.any(numpy_helper.to_array(init[pad.input[2]]) != 0):
                continue
        if len(pad.input) > 3 and pad.input[3]:  # explicit axes (opset 18): not produced by our exporter
            continue
        pads = numpy_helper.to_array(init[pad.input[1]]).astype(np.int64).ravel()
        if pads.size != 8 or np.any(pads[[0, 1, 4, 5]] != 0) or np.any(pads < 0):
            continue
        users = consumers[pad.output[0]]
        if pad.output[0] in graph_outputs or not users or any(
                u.op_type != "Conv" or u.input[0] != pad.output[0]
                or _attr(u, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") for u in users):
            continue
        top, left, bottom, right = pads[2], pads[3], pads[6], pads[7]
        for conv in users:
            old = list(_attr(conv, "pads", [0, 0, 0, 0]))
            _set_ints(conv, "pads", [old[0] + top, old[1] + left, old[2] + bottom, old[3] + right])
            conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        model.graph.node.remove(pad)
    _drop_unused_initializers(model)
    return len(folded)


def _drop_unused_initializers(model) -> None:
    used = {name for n in model.graph.node for name in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


def clean_graph(model):
    """Basic optimisation, then the Pad fold: the graph every gaikan export writes."""
    model = optimise_basic(model)
    fold_pads_into_convs(model)
    return model


def save_atomic(model, out: Path) -> Path:
    """Write ``model`` to a temporary sibling of ``out`` and rename it (never a half-written file;
    ``gaikan.io.atomic.atomic_file``)."""
    import onnx

    from gaikan.io.atomic import atomic_file

    with atomic_file(out, what="ONNX model") as tmp:
        onnx.save_model(model, tmp)
    return Path(out)
