"""The study's trust figure (bench/study_trust.py): which trials it finds, and its paired differences."""

from __future__ import annotations

import json

import pytest

from bench.study_trust import arm_differences, finished_trials, study_classifier


def _trial(study, arm, seed, evaluated=True, checkpoints=("checkpoint_2026-01-01_00-00-00.0",
                                                         "checkpoint_2026-01-02_00-00-00.0")):
    run = study / "train" / f"{arm}_s{seed}"
    run.mkdir(parents=True)
    for name in checkpoints:
        (run / name).mkdir(parents=True)
    if evaluated:
        (run / "eval.json").write_text(json.dumps([{"arm": arm, "seed": seed, "kind": "model"}]))
    return run


def test_finished_trials_takes_each_evaluated_run_and_its_newest_checkpoint(tmp_path):
    newest = _trial(tmp_path, "lambda0", 3) / "checkpoint_2026-01-02_00-00-00.0"
    _trial(tmp_path, "pull_l0.1", 3, evaluated=False)  # still training: not reported
    _trial(tmp_path, "pull_l0.1", 4, checkpoints=())  # evaluated rows without a checkpoint: nothing to load
    assert finished_trials(tmp_path) == [("lambda0", 3, str(newest))]


def test_the_study_classifier_must_be_unambiguous(tmp_path):
    with pytest.raises(SystemExit, match="found 0"):
        study_classifier(tmp_path)
    for key in ("a", "b"):
        (tmp_path / "classifiers" / key).mkdir(parents=True)
        (tmp_path / "classifiers" / key / "classifier.json").write_text("{}")
    with pytest.raises(SystemExit, match="found 2"):
        study_classifier(tmp_path)


def test_arm_differences_pair_by_seed():
    rows = [{"arm": arm, "seed": seed, "set": "S", "mean_expected": e, "mean_error": m}
            for arm, seed, e, m in [("lambda0", 0, 5.0, 6.0), ("lambda0", 1, 7.0, 8.0), ("lambda0", 2, 6.0, 7.0),
                                    ("pull", 0, 4.0, 5.5), ("pull", 1, 6.0, 7.5), ("pull", 2, 5.0, 6.5),
                                    ("pull", 9, 0.0, 0.0)]]  # seed 9 has no baseline: not paired
    out = {d["figure"]: d for d in arm_differences(rows, "lambda0")}
    assert out["mean_expected"]["mean"] == pytest.approx(-1.0) and out["mean_expected"]["seeds"] == 3
    assert out["mean_expected"]["low"] == pytest.approx(-1.0)  # the same difference on every seed: no spread
    assert out["mean_error"]["mean"] == pytest.approx(-0.5) and out["mean_error"]["high"] == pytest.approx(-0.5)


def test_a_repeated_run_measures_only_the_trials_it_has_not_measured(tmp_path, monkeypatch, capsys):
    """Each trial's rows are kept as soon as it finishes: after an interruption, or once more seeds finished, a
    second run reuses them (same checkpoint, same settings) and measures only what is new; a torn last line of an
    interrupted write is ignored."""
    import sys

    import bench.study_trust as study_trust

    study = tmp_path / "study"
    for arm in ("lambda0", "pull"):
        _trial(study, arm, 0)
    (study / "classifiers" / "k").mkdir(parents=True)
    (study / "classifiers" / "k" / "classifier.json").write_text("{}")
    measured = []

    def fake_measure(checkpoint, classifier, sets, args):  # the real one fits a trust model: minutes per trial
        measured.append(checkpoint)
        return [{"set": "S", "images": 1, "mean_expected": float(len(measured)), "mean_error": 1.0, "coverage": 0.9}]

    monkeypatch.setattr(study_trust, "measure_trial", fake_measure)
    out = tmp_path / "trust.json"
    argv = ["study_trust", "--study", str(study), "--sets", "S=nowhere", "--json", str(out), "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", argv)
    assert study_trust.main() == 0 and len(measured) == 2
    first = json.loads(out.read_text())
    with open(f"{out}.trials.jsonl", "a") as f:
        f.write('{"key": "torn')  # an interrupted append
    _trial(study, "lambda0", 1)
    assert study_trust.main() == 0
    assert len(measured) == 3 and measured[-1].startswith(str(study / "train" / "lambda0_s1"))
    second = json.loads(out.read_text())
    assert [r for r in second["rows"] if r["seed"] == 0] == first["rows"]  # reused as measured
    monkeypatch.setattr(sys, "argv", [*argv, "--crop", "96"])  # another setting: every trial measured again
    assert study_trust.main() == 0 and len(measured) == 6
