"""An exported ONNX model behind the Detector calls that ``gaikan.pipeline.predict_files`` uses
(``threshold``, ``score(images) -> ScoreResult``, ``p_values``): ``gaikan predict --runtime onnx``
(onnxruntime) and ``--runtime openvino`` (OpenVINO, the same .onnx file, float or int8).

The numbers come from ``gaikan.edge.EdgeScorer`` (no torch in the scoring path).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gaikan.detectors.base import ScoreResult, Thresholds, check_images
from gaikan.edge import EdgeScorer


class OnnxDetector:
    """Read-only detector view of an exported model: it scores, it cannot be fitted or saved."""

    supervised = False

    def __init__(self, path, *, threads: int = 0, batch_size: int = 1, runtime: str = "onnx"):
        self.scorer = EdgeScorer(path, threads=threads, batch_size=batch_size, runtime=runtime)
        self.runtime = runtime
        self.name = self.scorer.name
        self.input_size = self.scorer.input_size
        self.thresholds = Thresholds(default_method=self.scorer.threshold_method or "max-good",
                                     values=dict(self.scorer.thresholds) or {"max-good": self.scorer.threshold})

    @property
    def threshold(self) -> float:
        return self.scorer.threshold

    def score(self, images: Sequence[np.ndarray]) -> ScoreResult:
        scores, maps = self.scorer.score(check_images(images))
        return ScoreResult(scores, maps)

    def p_values(self, scores) -> np.ndarray | None:
        return self.scorer.p_values(scores)
