"""Model: backbones, RoI heads, the Detector and its factory."""
from ioulab.detector.model.build import build_model, configure_inference
from ioulab.detector.model.detector import Detector

__all__ = ["build_model", "configure_inference", "Detector"]
