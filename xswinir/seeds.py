"""Every seed the project derives, each a pure function of a few integers: the same inputs, the same draws.

A run has one seed (``train.seed``; ``--seed`` for evaluation). Each random stream gets its own seed from
it, so that a stream never depends on what ran before it: a resumed run draws what a straight one does, and
an evaluation's LR image does not depend on the order of the files.

====================  ==========================================  ================================================
stream                seed                                        drawn by
====================  ==========================================  ================================================
initial weights       ``train.seed`` itself                       ``trainer.build_training_parts`` (global RNG)
batch keys            :func:`batch_seed` ``(seed, step, rank)``   ``data.StepBatchSampler``: images, crop seeds
DataLoader            :func:`loader_seed` ``(seed, rank)``        the training ``DataLoader``'s own generator
further crops         :func:`crop_seed` ``(crop seed, c)``        ``data.PatchDataset``: crop ``c > 0`` of a key
degradations          :func:`step_seed` ``DEGRADE_STREAM``        ``trainer.run_step``: the batch's LQ
model                 :func:`step_seed` ``MODEL_STREAM``          ``trainer.run_step``: stochastic depth
validation            :func:`validation_seed` ``(index)``         ``evaluation.build_validation_set``: fixed LQ
evaluation            :func:`image_seed` ``(seed, file name)``    ``evaluation.degrade``: one test image's LQ
classifier pairs      ``texture.classifier.seed`` itself          ``texture.training``: windows and their LQ
explanation           ``explain --seed`` itself                   ``explain.explain``: the HR image's LQ
====================  ==========================================  ================================================

The hashed seeds (:func:`hash_seed`) are 63-bit and stable across processes and Python versions; the step
seeds are a mixed-radix number, so that two steps, ranks or streams never share one. The values are part of
a run's reproducibility (``tests/test_seeds.py`` pins them): changing a formula changes every batch.
"""

from __future__ import annotations

import hashlib

import torch

DEGRADE_STREAM, MODEL_STREAM = 0, 1  # the streams of one training step: degradations, model (stochastic depth)
VALIDATION_SEED_BASE = 10_000  # validation image i is degraded with seed 10_000 + i in every run


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def batch_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the batch keys (images and crop seeds) of step ``step`` on rank ``rank``."""
    return hash_seed(seed, step, rank)


def loader_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s ``DataLoader`` generator (its own, so that starting it draws nothing global)."""
    return hash_seed(seed, rank)


def crop_seed(seed: int, crop: int) -> int:
    """The seed of crop ``crop`` (>= 1) of a batch key whose first crop uses ``seed`` itself."""
    return hash_seed(seed, crop)


def step_seed(seed: int, step: int, rank: int, stream: int = DEGRADE_STREAM) -> int:
    """The seed of one stream of random draws of one step on one rank, independent of history.

    Args:
        seed: the run's ``train.seed``.
        step: the 0-based optimisation step.
        rank: the worker's rank (< 1009).
        stream: :data:`DEGRADE_STREAM` or :data:`MODEL_STREAM` (< 8).
    """
    return ((seed * 1_000_003 + step) * 1_009 + rank) * 8 + stream


def validation_seed(index: int) -> int:
    """The degradation seed of validation image ``index``: the same LQ input at every validation of every run."""
    return VALIDATION_SEED_BASE + index


def image_seed(seed: int, name: str) -> int:
    """The degradation seed of one test image: a stable hash of ``(seed, file name)``, independent of file order."""
    name_key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return hash_seed(seed, name_key)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A seeded generator on ``device``, as :meth:`xswinir.degradations.Degrader.forward` needs for a batch there."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)
