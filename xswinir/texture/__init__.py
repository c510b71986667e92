"""The linear texture classifier: named texture features, a pair classifier on them, its training and cache.

``TextureFeatures`` turns windows into named features (for all windows of an image in one pass),
``TextureClassifier`` scores "same texture?" for pairs with ``2F + 1`` readable weights, and
``train_texture_classifier`` / ``ensure_texture_classifier`` fit it in seconds from HR images.
"""

from xswinir.texture.classifier import (
    TextureClassifier,
    TextureClassifierError,
    load_texture_classifier,
    plot_classifier_weights,
    save_texture_classifier,
)
from xswinir.texture.features import TextureFeatures
from xswinir.texture.training import ensure_texture_classifier, roc_auc, train_texture_classifier

__all__ = [
    "TextureClassifier",
    "TextureClassifierError",
    "TextureFeatures",
    "ensure_texture_classifier",
    "load_texture_classifier",
    "plot_classifier_weights",
    "roc_auc",
    "save_texture_classifier",
    "train_texture_classifier",
]
