"""Derived seeds: pinned values (a changed formula changes every batch of a resumed run) and distinct streams."""

from __future__ import annotations

import itertools

import pytest
import torch

from xswinir.seeds import (
    DEGRADE_STREAM,
    MODEL_STREAM,
    batch_seed,
    crop_seed,
    hash_seed,
    image_seed,
    loader_seed,
    make_generator,
    step_seed,
    validation_seed,
)

# Computed with the formulas as they stood in data.sample_seed, trainer.step_seed, evaluation.image_seed and
# evaluation.build_validation_set before they moved here.
PINNED = [
    (crop_seed(123456789, 1), 4796980324121189442),
    (crop_seed(123456789, 2), 8914363193222034707),
    (crop_seed(123456789, 3), 4450766938539576532),
    (batch_seed(0, 0, 0), 8866250585812870066),
    (batch_seed(42, 7, 1), 3421187610238871334),
    (batch_seed(2**40, 10**6, 3), 4616508597997589682),
    (loader_seed(0, 0), 7120306904099482837),
    (loader_seed(42, 1), 3969959676567302753),
    (step_seed(0, 0, 0), 0),
    (step_seed(42, 7, 1), 339025073584),
    (step_seed(42, 7, 1, MODEL_STREAM), 339025073585),
    (image_seed(0, "baby.png"), 6174852965606546893),
    (image_seed(7, "butterfly.png"), 125886587602533265),
    (image_seed(0, "Canon5D2_5_160_3200_chair_11.JPG"), 7755201626677238810),
    (validation_seed(0), 10_000),
    (validation_seed(3), 10_003),
]


@pytest.mark.parametrize(("got", "expected"), PINNED)
def test_seeds_keep_their_values(got: int, expected: int) -> None:
    assert got == expected


def test_hashed_seeds_fit_a_generator() -> None:
    for seed in (hash_seed(), hash_seed(0), batch_seed(2**62, 10**9, 1023), image_seed(5, "ü.png")):
        assert 0 <= seed < 2**63
        make_generator(seed)  # manual_seed accepts it


def test_streams_of_one_step_differ() -> None:
    seed, step, rank = 3, 11, 2
    seeds = [batch_seed(seed, step, rank), loader_seed(seed, rank), step_seed(seed, step, rank, DEGRADE_STREAM),
             step_seed(seed, step, rank, MODEL_STREAM)]
    assert len(set(seeds)) == len(seeds)


def test_step_seeds_are_distinct_across_steps_ranks_and_streams() -> None:
    grid = list(itertools.product(range(3), range(50), range(4), (DEGRADE_STREAM, MODEL_STREAM)))
    assert len({step_seed(*key) for key in grid}) == len(grid)


def test_hashed_seeds_depend_on_every_part_and_its_position() -> None:
    assert batch_seed(1, 2, 3) != batch_seed(1, 3, 2) != batch_seed(2, 2, 3)
    assert loader_seed(1, 2) != batch_seed(1, 2, 0)  # a different number of parts is a different seed
    assert len({crop_seed(99, c) for c in range(1, 100)}) == 99


def test_image_seeds_depend_on_the_seed_and_the_name_only() -> None:
    names = [f"img_{i:03d}.png" for i in range(50)]
    assert len({image_seed(0, n) for n in names}) == len(names)
    assert image_seed(0, "a.png") != image_seed(1, "a.png")
    assert image_seed(0, "Canon5D2_5_160_3200_chair_11.JPG") != image_seed(0, "Canon5D2_5_160_3200_chair_12.JPG")


def test_make_generator_is_a_seeded_torch_generator() -> None:
    expected = torch.rand(4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.rand(4, generator=make_generator(5)), expected)
    assert make_generator(5, "cpu").device == torch.device("cpu")
