"""ioulab.detector: Faster R-CNN + IoU-aware localization (no Ray, no MLflow imports here)."""
