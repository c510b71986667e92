"""The texture classifier that travels with a training run: packed on the driver, unpacked on every worker.

The classifier's files (a few KB) travel inside Ray Train's train-loop config, so that workers on other machines
need no shared file system; every checkpoint keeps a copy, so that a checkpoint alone restores or explains its run.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from xswinir.config import Config
from xswinir.errors import ConfigError
from xswinir.paths import classifier_cache
from xswinir.texture.classifier import TextureClassifier, load_texture_classifier
from xswinir.texture.training import ensure_texture_classifier


@dataclass(frozen=True)
class ClassifierPayload:
    """A run's texture classifier, ready to travel to the workers."""

    path: Path  # the folder its files come from: the run's texture.classifier.path from here on
    files: dict[str, bytes]  # file name -> content


def classifier_payload(cfg: Config, cache: Path | None = None) -> ClassifierPayload | None:
    """The classifier of a run with the texture term (trained and cached on first use), packed for the workers.

    The classifier's patch size is checked against ``texture.patch_size`` here, before Ray starts, so that the
    two agree for the whole run: the loss tiles at the classifier's, the config's gates the crop sizes.

    Args:
        cfg: the run's config.
        cache: where classifiers trained on the fly are kept; None: ``<storage>/classifiers``.

    Returns:
        None when the texture term is off (``loss.texture_weight = 0``).

    Raises:
        UserError: ``texture.classifier.path`` holds no classifier, or one trained on another patch size.
    """
    if not cfg.texture_enabled:
        return None
    path = Path(ensure_texture_classifier(cfg, cache if cache is not None else classifier_cache(cfg.run.storage)))
    p = load_texture_classifier(path).patch_size
    if p != cfg.texture.patch_size:
        raise ConfigError(f"the texture classifier was trained on {p} px patches but texture.patch_size is "
                          f"{cfg.texture.patch_size}; retrain it or set texture.patch_size={p}")
    return ClassifierPayload(path, {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file()})


def classifier_from_payload(
    files: dict[str, bytes] | None, device: torch.device
) -> tuple[TextureClassifier | None, Path | None]:
    """Writes the classifier files that travelled in the train-loop config to a local folder and loads them.

    Args:
        files: :attr:`ClassifierPayload.files`, or None when the run has no texture term.

    Returns:
        The classifier on ``device`` and its local folder (copied into every checkpoint); ``(None, None)``
        without files.
    """
    if files is None:
        return None, None
    folder = Path(tempfile.mkdtemp(prefix="xswinir_classifier_"))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return load_texture_classifier(folder).to(device), folder
