"""Evaluation helpers that need no download (e.g. sample quality of image models)."""
from moejax.eval.image_quality import (ImageClassifier, fit_classifier,
                                       frechet_distance, sample_quality)

__all__ = ["ImageClassifier", "fit_classifier", "frechet_distance",
           "sample_quality"]
