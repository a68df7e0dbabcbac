"""Evaluation metrics: FID (every value labelled with its extractor), IS, precision/recall,
reconstruction quality, and the domain classifier used as the default feature extractor.

clean-fid is imported only when an Inception extractor is built.
"""

from rae_core.metrics.domain import (
    DomainClassifier,
    class_accuracy,
    classifier_id,
    load_classifier,
    save_classifier,
    train_domain_classifier,
)
from rae_core.metrics.features import (
    CLEANFID_CACHE,
    INCEPTION_FILE,
    DomainExtractor,
    FeatureExtractor,
    InceptionExtractor,
)
from rae_core.metrics.fid import (
    FeatureStats,
    StatsAccumulator,
    compute_reference_stats,
    fid_from_features,
    frechet_distance,
)
from rae_core.metrics.inception_score import inception_score
from rae_core.metrics.precision_recall import precision_recall
from rae_core.metrics.reconstruction import l1, psnr, rfid

__all__ = [
    "CLEANFID_CACHE",
    "INCEPTION_FILE",
    "DomainClassifier",
    "DomainExtractor",
    "FeatureExtractor",
    "FeatureStats",
    "InceptionExtractor",
    "StatsAccumulator",
    "class_accuracy",
    "classifier_id",
    "compute_reference_stats",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
    "l1",
    "load_classifier",
    "precision_recall",
    "psnr",
    "rfid",
    "save_classifier",
    "train_domain_classifier",
]
