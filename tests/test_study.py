"""The study runner without Ray: its config, the paired statistics and the report (the Ray run: integration/)."""

from __future__ import annotations

import json
import math

import pytest

from xswinir.config import ConfigError
from xswinir.tune.study import (
    EVAL_FILE,
    StudyConfig,
    load_study_config,
    paired_difference,
    run_name,
    summarise,
    with_absolute_paths,
    write_report,
)


def _write_yaml(path, text: str):
    path.write_text(text)
    return path


def test_shipped_profiles_load_and_every_arm_is_a_valid_config():
    for name in ("study_cpu", "study_gpu"):
        study = load_study_config(name)
        assert study.baseline in study.arms and len(study.seeds) >= 3
        for arm in study.arms:
            cfg = study.arm_config(arm, study.seeds[-1])
            assert cfg.train.seed == study.seeds[-1]
        weights = {arm: study.arm_config(arm, 0).loss.texture_weight for arm in study.arms}
        assert weights[study.baseline] == 0 and all(w > 0 for a, w in weights.items() if a != study.baseline)
        forms = {study.arm_config(arm, 0).loss.texture_form for arm in study.arms if weights[arm] > 0}
        assert forms == {"projection", "pull"}  # the new term and the first one, side by side


def test_arms_differ_only_in_their_overrides():
    study = load_study_config("study_cpu")
    base = study.arm_config(study.baseline, 1).to_dict()
    other = study.arm_config("projection_l1", 1).to_dict()
    differing = {(section, key) for section in base for key in base[section]
                 if base[section][key] != other[section][key]}
    assert differing == {("loss", "texture_weight")}


@pytest.mark.parametrize("text, match", [
    ("arms: {a: [loss.texture_weight=0]}\nbaseline: lambda0\n", "baseline"),
    ("arms: {lambda0: [loss.texture_weight=0]}\nseeds: [1]\n", "seeds"),
    ("arms: {lambda0: [loss.texture_weight=0]}\nseeds: [1, 1]\n", "seeds"),
    ("arms: {lambda0: [loss.texture_wieght=0]}\n", "texture_weight"),
    ("arms: {lambda0: loss.texture_weight=0}\n", "arms"),
    ("arms: {lambda0: []}\nstudy_name: x\n", "unknown config key 'study_name'"),
    ("arms: {lambda0: []}\nname: 5\n", "name must be a string, got 5"),
    ("arms: {lambda0: []}\nseeds: [0, a]\n", r"seeds\[1\] must be an integer"),
    ("arms: {lambda0: [], ../x: []}\n", "an arm's name must be"),
    ("arms: {lambda0: []}\nstorage: s3://bucket/studies\n", "local or mounted folder"),
])
def test_bad_study_files_are_refused_before_anything_runs(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_study_config(_write_yaml(tmp_path / "s.yaml", text))


def test_relative_paths_become_absolute_for_trials(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path)
    study = load_study_config(_write_yaml(tmp_path / "s.yaml", (
        "base: demo\noverrides: ['data.train=a;b;skimage:grass']\narms: {lambda0: [loss.texture_weight=0]}\n"
        "eval_sets: [a, skimage:val]\nstorage: out\n")))
    fixed = with_absolute_paths(study)
    assert fixed.arm_config("lambda0", 0).data.train == f"{tmp_path / 'a'};{tmp_path / 'b'};skimage:grass"
    assert fixed.eval_sets == [str(tmp_path / "a"), "skimage:val"]
    assert fixed.storage == str(tmp_path / "out")


def test_paired_lq_and_classifier_paths_become_absolute_too(tmp_path, monkeypatch):
    # Every local path a trial reads, as the sweep makes them absolute: the LQ folder and the classifier too.
    for folder in ("gt", "lq", "clf"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path)
    study = load_study_config(_write_yaml(tmp_path / "s.yaml", (
        "base: demo\noverrides: [data.train=gt, data.train_lq=lq, texture.classifier.path=clf]\n"
        "arms: {lambda0: [loss.texture_weight=0]}\nstorage: out\n")))
    fixed = with_absolute_paths(study).arm_config("lambda0", 0)
    assert fixed.data.train == str(tmp_path / "gt")
    assert fixed.data.train_lq == str(tmp_path / "lq")
    assert fixed.texture.classifier.path == str(tmp_path / "clf")


def test_paired_difference_matches_a_hand_computed_t_interval():
    arm = {0: 30.0, 1: 30.5, 2: 29.9}
    base = {0: 29.8, 1: 30.1, 2: 30.0, 3: 31.0}  # seed 3 has no partner and is left out
    d = paired_difference(arm, base)
    diffs = [0.2, 0.4, -0.1]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert d["mean"] == pytest.approx(mean) and d["n"] == 3 and d["wins"] == 2
    assert d["low"] == pytest.approx(mean - half) and d["high"] == pytest.approx(mean + half)
    assert paired_difference({0: 1.0}, {0: 0.5}) is None


def _fake_rows(study: StudyConfig, offset: dict[str, float]) -> list[dict]:
    rows = []
    for arm in study.arms:
        for seed in study.seeds:
            for image in ("a", "b"):
                base = 30.0 + seed * 0.1 + (image == "b")
                rows.append({"arm": arm, "seed": seed, "kind": "model", "set": "S", "image": image,
                             "psnr_y": base + offset[arm], "ssim_y": 0.9, "lpips": None})
                rows.append({"arm": arm, "seed": seed, "kind": "bicubic", "set": "S", "image": image,
                             "psnr_y": 28.0, "ssim_y": 0.8, "lpips": None})
    return rows


def test_summary_pairs_by_seed_and_reports_bicubic_once(tmp_path):
    study = StudyConfig(arms={"lambda0": [], "x": ["loss.texture_weight=1"]}, seeds=[0, 1, 2],
                        storage=str(tmp_path), name="s")
    summary = summarise(study, _fake_rows(study, {"lambda0": 0.0, "x": 0.25}))
    means = {(r["arm"], r["set"]): r for r in summary["means"]}
    assert means[("bicubic", "S")]["psnr_y"] == pytest.approx(28.0)
    assert means[("lambda0", "S")]["psnr_y"] == pytest.approx(30.6)
    diff = next(d for d in summary["differences"] if d["metric"] == "psnr_y")
    assert diff["mean"] == pytest.approx(0.25) and diff["wins"] == 3
    assert diff["low"] == pytest.approx(0.25) and diff["high"] == pytest.approx(0.25)  # no spread over seeds
    assert not [d for d in summary["differences"] if d["metric"] == "lpips"]  # n/a everywhere: no difference


def test_report_files_from_eval_json(tmp_path):
    study = StudyConfig(arms={"lambda0": [], "x": ["loss.texture_weight=1"]}, seeds=[0, 1],
                        storage=str(tmp_path), name="s")
    rows = _fake_rows(study, {"lambda0": 0.0, "x": -0.1})
    for arm in study.arms:
        for seed in study.seeds:
            folder = tmp_path / "s" / "train" / run_name(arm, seed)
            folder.mkdir(parents=True)
            (folder / EVAL_FILE).write_text(json.dumps([r for r in rows if r["arm"] == arm and r["seed"] == seed]))
    report = write_report(study)
    text = report.read_text()
    assert "| S | x | psnr_y | -0.1000 |" in text and "0/2" in text
    assert (tmp_path / "s" / "study.parquet").is_file() and (tmp_path / "s" / "study_psnr.png").stat().st_size > 5000
    assert not [p.name for p in (tmp_path / "s").iterdir() if ".tmp" in p.name]  # each file moved into place
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "s" / "study.parquet").to_pylist()
    assert len(table) == len(rows) and {r["kind"] for r in table} == {"model", "bicubic"}


def test_the_command_is_listed_and_documents_itself(capsys):
    from xswinir.cli import build_parser

    parser = build_parser()
    assert "study" in parser.format_help()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["study", "--help"])
    assert exit_info.value.code == 0 and "--report-only" in capsys.readouterr().out


def test_resume_of_a_study_without_our_manifest_is_refused_before_ray(tmp_path, monkeypatch, capsys):
    import pickle

    import ray

    from xswinir.cli import main

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("XSWINIR_SWEEP_KEY", raising=False)
    config = _write_yaml(tmp_path / "s.yaml", f"name: s\narms: {{lambda0: []}}\nstorage: {tmp_path / 'studies'}\n")
    folder = tmp_path / "studies" / "s"
    folder.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (folder / "tuner.pkl").write_bytes(pickle.dumps(_Touch(marker)))  # copied in by someone else
    assert main(["study", "--config", str(config), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "refusing to resume" in err and "xswinir_manifest.json is missing" in err
    assert not marker.exists() and not ray.is_initialized()


class _Touch:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.marker),)
