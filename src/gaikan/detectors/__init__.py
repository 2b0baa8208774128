"""Detectors: one module per method, all answering the interface of ``base.Detector``."""

from gaikan.detectors.base import Detector, ScoreResult, Thresholds, detector_names, get_detector_class, load_detector
from gaikan.detectors.classifier import CNNClassifier
from gaikan.detectors.padim import PaDiM
from gaikan.detectors.patchcore import PatchCore
from gaikan.detectors.patch_metric import PatchMetric
from gaikan.detectors.siamese import SiameseDetector
from gaikan.detectors.triplet import TripletDetector
from gaikan.detectors.classifier_embedding import ClassifierEmbeddingDetector

__all__ = ["ClassifierEmbeddingDetector", "CNNClassifier", "Detector", "PaDiM", "PatchCore", "PatchMetric", "SiameseDetector", "TripletDetector", "ScoreResult", "Thresholds", "detector_names", "get_detector_class", "load_detector"]
