"""The linear texture classifier and the search built on it: named features, a pair classifier, its training.

``TextureFeatures`` turns windows into named features (for all windows of an image in one pass),
``TextureClassifier`` scores "same texture?" for pairs with ``2F + P + 1`` readable weights (P named pair features),
``train_texture_classifier`` / ``ensure_texture_classifier`` fit it in seconds from HR images, and
``TextureSearch`` finds, for every patch of an image, the windows elsewhere with its texture (the loss's and the
explanations' search).
"""

from xswinir.texture.classifier import (
    TextureClassifier,
    TextureClassifierError,
    load_texture_classifier,
    plot_classifier_weights,
    save_texture_classifier,
)
from xswinir.texture.features import TextureFeatures
from xswinir.texture.search import TextureMatch, TextureSearch
from xswinir.texture.training import ensure_texture_classifier, roc_auc, train_texture_classifier

__all__ = [
    "TextureClassifier",
    "TextureClassifierError",
    "TextureFeatures",
    "TextureMatch",
    "TextureSearch",
    "ensure_texture_classifier",
    "load_texture_classifier",
    "plot_classifier_weights",
    "roc_auc",
    "save_texture_classifier",
    "train_texture_classifier",
]
