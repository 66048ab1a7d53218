"""Model builders: flows (each returning an :class:`impflow.Flow`) and the Lipschitz classifier."""

from .classic import dlf, glow, linear, maf, nsf, realnvp
from .classifier import LipschitzClassifier, classifier
from .image import default_image_logdet, image_impflow, image_resflow
from .residual import impflow, resflow

__all__ = [
    "resflow", "impflow", "image_resflow", "image_impflow", "default_image_logdet",
    "realnvp", "glow", "maf", "nsf", "dlf", "linear",
    "classifier", "LipschitzClassifier",
]  # fmt: skip
