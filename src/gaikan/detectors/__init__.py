"""Detectors: one module per method, all answering the interface of ``base.Detector``."""

from gaikan.detectors.base import Detector, ScoreResult, Thresholds, detector_names, get_detector_class, load_detector
from gaikan.detectors.classifier import CNNClassifier
from gaikan.detectors.padim import PaDiM
from gaikan.detectors.patchcore import PatchCore

__all__ = ["CNNClassifier", "Detector", "PaDiM", "PatchCore", "ScoreResult", "Thresholds", "detector_names", "get_detector_class", "load_detector"]
