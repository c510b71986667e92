"""The study runner without Ray: its config, the paired statistics and the report (the Ray run: integration/)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
import yaml

from xswinir.config import PACKAGED_CONFIGS, ConfigError
from xswinir.storage import read_file, write_file
from xswinir.tune.study import (
    EVAL_FILE,
    StudyConfig,
    StudyStorageError,
    load_study_config,
    paired_difference,
    run_name,
    study_trial,
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


def test_the_confirm_stage_tests_the_screens_pick_on_new_seeds_and_sun80():
    """study_confirm.yaml as registered: the screen's base and overrides, lambda0 and the picked arm copied verbatim
    from study_screen.yaml, seeds disjoint from the screen's, Sun80 first (the primary set), another eval seed."""
    screen, confirm = load_study_config("study_screen"), load_study_config("study_confirm")
    assert (confirm.base, confirm.overrides) == (screen.base, screen.overrides)
    assert set(confirm.arms) == {"lambda0", "pull_l0.1"}
    assert all(confirm.arms[arm] == screen.arms[arm] for arm in confirm.arms)
    assert len(confirm.seeds) >= 8 and not set(confirm.seeds) & set(screen.seeds)
    assert confirm.eval_sets[0].endswith("Sun80") and confirm.eval_seed != screen.eval_seed


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
    ("overrides: ['']\narms: {lambda0: [loss.texture_weight=0]}\n", "overrides: override '' is not of the form"),
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
    text = write_report(study)
    assert text == (tmp_path / "s" / "study.md").read_text()
    assert "| S | x | psnr_y | -0.1000 |" in text and "0/2" in text
    assert (tmp_path / "s" / "study.parquet").is_file() and (tmp_path / "s" / "study_psnr.png").stat().st_size > 5000
    assert not [p.name for p in (tmp_path / "s").iterdir() if ".tmp" in p.name]  # each file moved into place
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "s" / "study.parquet").to_pylist()
    assert len(table) == len(rows) and {r["kind"] for r in table} == {"model", "bicubic"}


def test_pick_applies_the_registered_rule_to_the_finished_screen(tmp_path, capsys):
    """`xswinir study --report-only --pick`: the arm with the larger PSNR gain that loses no SSIM, and the line that
    goes into study_confirm.yaml; an arm short of two seeds stops the pick with the reason."""
    from xswinir.cli import main

    arms = {"lambda0": ["loss.texture_weight=0.0"], "up": ["loss.texture_weight=0.1", "loss.texture_form=pull"],
            "upper": ["loss.texture_weight=0.3", "loss.texture_form=pull"]}
    path = tmp_path / "screen.yaml"
    path.write_text(yaml.safe_dump({"name": "screen", "base": "demo", "arms": arms, "seeds": [0, 1],
                                    "storage": str(tmp_path)}))
    study = load_study_config(path)
    rows = _fake_rows(study, {"lambda0": 0.0, "up": 0.05, "upper": 0.2})
    for row in rows:  # "upper" gains more PSNR but loses SSIM: it does not qualify
        row["ssim_y"] -= 0.01 * (row["arm"] == "upper" and row["kind"] == "model")
    for arm in study.arms:
        folder = tmp_path / "screen" / "train" / run_name(arm, 0)
        folder.mkdir(parents=True)
        (folder / EVAL_FILE).write_text(json.dumps([r for r in rows if r["arm"] == arm and r["seed"] == 0]))
    assert main(["study", "--config", str(path), "--report-only", "--pick"]) == 2  # seed 1 has not finished
    assert "arm 'up' has no paired difference" in capsys.readouterr().err
    for arm in study.arms:
        folder = tmp_path / "screen" / "train" / run_name(arm, 1)
        folder.mkdir(parents=True)
        (folder / EVAL_FILE).write_text(json.dumps([r for r in rows if r["arm"] == arm and r["seed"] == 1]))
    assert main(["study", "--config", str(path), "--report-only", "--pick"]) == 0
    out = capsys.readouterr().out
    assert "| upper | 0.3 | +0.2000 | -0.01000 | +0.2000 | no |" in out
    assert "| up (picked) | 0.1 | +0.0500 | +0.00000 | +0.0500 | yes |" in out
    assert "study_confirm.yaml's arm, copied verbatim: up: [loss.texture_weight=0.1, loss.texture_form=pull]" in out
    for flags in (["--pick"], ["--join", "other"]):
        assert main(["study", "--config", str(path), *flags]) == 2
        assert f"{flags[0]} analyses a finished study: use it with --report-only" in capsys.readouterr().err


def test_confirm_analysis_reports_the_primary_power_and_bootstrap(tmp_path, capsys):
    """`xswinir study --report-only --confirm` on a two-arm study: the primary interval on the first evaluation
    set as the summary computes it, the power rule's count for that spread, the answer and the bootstrap."""
    from xswinir.cli import main
    from xswinir.tune.prereg import seeds_needed

    arms = {"lambda0": ["loss.texture_weight=0.0"], "up": ["loss.texture_weight=0.1", "loss.texture_form=pull"]}
    path = tmp_path / "confirm.yaml"
    path.write_text(yaml.safe_dump({"name": "confirm", "base": "demo", "arms": arms, "seeds": [0, 1, 2],
                                    "eval_sets": ["S"], "storage": str(tmp_path)}))
    study = load_study_config(path)
    gains = {0: 0.02, 1: 0.10, 2: 0.06}  # sd 0.04 dB over three seeds
    for arm in study.arms:
        for seed in study.seeds:
            rows = [{"arm": arm, "seed": seed, "kind": "model", "set": "S", "image": image,
                     "psnr_y": 30.0 + j + (gains[seed] if arm == "up" else 0.0), "ssim_y": 0.9}
                    for j, image in enumerate("abc")]
            # Seed 2 ran later, under another name (the power rule's extra seeds): it joins the report.
            folder = tmp_path / ("confirm_more" if seed == 2 else "confirm") / "train" / run_name(arm, seed)
            folder.mkdir(parents=True)
            (folder / EVAL_FILE).write_text(json.dumps(rows))
    assert main(["study", "--config", str(path), "--report-only", "--confirm"]) == 0
    assert "paired over seeds [0, 1]:" in capsys.readouterr().out
    assert main(["study", "--config", str(path), "--report-only", "--confirm", "--join", "confirm_more"]) == 0
    out = capsys.readouterr().out
    assert "paired over seeds [0, 1, 2]:" in out
    half = 4.302652729911275 * 0.04 / math.sqrt(3)
    assert f"+0.0600 dB, 95 % t interval [{0.06 - half:+.4f}, {0.06 + half:+.4f}]" in out
    assert "(half-width 0.0994 dB; goal ≤ 0.05: not met); sd over seeds 0.0400 dB; 3/3 seeds better." in out
    wanted = seeds_needed(0.04, 3)
    assert f"Power rule: {wanted} seeds for the goal at this sd; run {wanted - 3} more" in out
    assert "Answer: no detectable effect: Y-PSNR on S changes by +0.060" in out
    assert "Default form or λ may change: no" in out and "Per-image bootstrap" in out
    written = tmp_path / "confirm"  # beside the study's own report, not the joined one's
    assert (written / "confirm.md").read_text() in out
    assert (written / "confirm_per_image.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_is_listed_and_documents_itself(capsys):
    from xswinir.cli import build_parser

    parser = build_parser()
    assert "study" in parser.format_help()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["study", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert exit_info.value.code == 0 and "--report-only" in out and "--export-models DIR" in out
    assert "paired 95% intervals" in out and "95%%" not in out  # a description is printed as it is
    shipped = sorted(p.stem for p in PACKAGED_CONFIGS.glob("study*.yaml"))
    assert {"study_cpu", "study_gpu", "study_screen", "study_confirm"} <= set(shipped)
    assert f"the name of a shipped one: {', '.join(shipped)}" in out
    assert "paired 95% intervals" in " ".join(parser.format_help().split())  # the listing %-formats its line


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


def test_old_studies_with_bicubic_in_every_trial_summarise_as_new_ones(tmp_path):
    # Before: every trial evaluated bicubic (the same inputs, the same numbers); now only the baseline arm's do.
    study = StudyConfig(arms={"lambda0": [], "x": ["loss.texture_weight=1"], "y": ["loss.texture_weight=2"]},
                        seeds=[0, 1, 2], storage=str(tmp_path), name="s")
    old = _fake_rows(study, {"lambda0": 0.0, "x": 0.25, "y": -0.5})
    new = [r for r in old if r["kind"] == "model" or r["arm"] == study.baseline]
    assert len(new) < len(old)
    assert summarise(study, new) == summarise(study, old)
    # An old study whose baseline trial of one seed never finished: another arm's copy stands in for it.
    partial_old = [r for r in old if not (r["arm"] == study.baseline and r["seed"] == 2)]
    partial_new = [r for r in new if not (r["arm"] == study.baseline and r["seed"] == 2)]
    bicubic = next(r for r in summarise(study, partial_old)["means"] if r["arm"] == "bicubic")
    assert bicubic["seeds"] == 3 and bicubic["psnr_y"] == pytest.approx(28.0)
    assert next(r for r in summarise(study, partial_new)["means"] if r["arm"] == "bicubic")["seeds"] == 2


def test_a_study_may_live_in_a_bucket():
    study = StudyConfig(arms={"lambda0": []}, seeds=[0, 1], storage="s3://bucket/studies/", name="s")
    assert study.experiment_path() == "s3://bucket/studies/s"
    assert study.run_path("lambda0", 1) == "s3://bucket/studies/s/train/lambda0_s1"
    assert with_absolute_paths(study).storage == "s3://bucket/studies/"


@pytest.fixture(scope="module")
def s3_server():
    from tests.s3.endpoint import moto_server

    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3_server, monkeypatch) -> str:
    """A new bucket on the local S3 server, the AWS variables pointing at it for this test."""
    from tests.s3.endpoint import point_at

    point_at(s3_server, monkeypatch)
    return s3_server.new_bucket("study")


def _keys(s3_server, bucket: str, prefix: str = "") -> list[str]:
    from tests.s3.endpoint import list_keys

    return list_keys(s3_server.filesystem(), f"{bucket}/{prefix}".rstrip("/"))


def _write_eval_files(study: StudyConfig, rows: list[dict]) -> None:
    for arm in study.arms:
        for seed in study.seeds:
            mine = [r for r in rows if r["arm"] == arm and r["seed"] == seed]
            write_file(f"{study.run_path(arm, seed)}/{EVAL_FILE}", lambda path, m=mine: path.write_text(
                json.dumps(m)))


def test_the_report_in_a_bucket_is_the_local_report(tmp_path, s3_server, bucket):
    import pyarrow.parquet as pq

    from xswinir.tune.study import STUDY_PLOT, STUDY_REPORT, STUDY_SUMMARY, STUDY_TABLE

    arms = {"lambda0": [], "x": ["loss.texture_weight=1"]}
    local = StudyConfig(arms=arms, seeds=[0, 1, 2], storage=str(tmp_path), name="s")
    remote = dataclasses.replace(local, storage=f"s3://{bucket}/studies")
    rows = [r for r in _fake_rows(local, {"lambda0": 0.0, "x": 0.3}) if r["kind"] == "model" or r["arm"] == "lambda0"]
    rows = [{**r, "psnr_y": r["psnr_y"] + 0.01 * r["seed"] ** 2 * (r["arm"] == "x")} for r in rows]  # some spread
    for study in (local, remote):
        _write_eval_files(study, rows)
    assert write_report(remote) == write_report(local)
    keys = _keys(s3_server, bucket, "studies/s")
    assert {STUDY_TABLE, STUDY_REPORT, STUDY_SUMMARY, STUDY_PLOT} <= set(keys)
    assert not [k for k in keys if k.endswith(".tmp")]
    for name in (STUDY_REPORT, STUDY_SUMMARY):
        assert read_file(f"{remote.experiment_path()}/{name}") == (tmp_path / "s" / name).read_bytes()
    table = pq.read_table(pa.BufferReader(read_file(f"{remote.experiment_path()}/{STUDY_TABLE}")))
    assert table.equals(pq.read_table(tmp_path / "s" / STUDY_TABLE))
    assert read_file(f"{remote.experiment_path()}/{STUDY_PLOT}")[:4] == b"\x89PNG"


def test_report_only_on_an_empty_bucket_study_names_where_it_looked(bucket):
    from xswinir.errors import UserError

    study = StudyConfig(arms={"lambda0": []}, seeds=[0, 1], storage=f"s3://{bucket}/studies", name="s")
    with pytest.raises(UserError, match=f"no finished trial to report on in s3://{bucket}/studies/s"):
        write_report(study)


def test_an_eval_file_that_is_not_json_is_one_line(tmp_path):
    study = StudyConfig(arms={"lambda0": []}, seeds=[0, 1], storage=str(tmp_path), name="s")
    folder = tmp_path / "s" / "train" / "lambda0_s0"
    folder.mkdir(parents=True)
    (folder / EVAL_FILE).write_text('[{"arm": ')
    with pytest.raises(StudyStorageError, match=r"lambda0_s0/eval\.json is not JSON"):
        write_report(study)


# The trials below are the real trial function with the training left out: each "trained" model is a freshly
# initialised one saved as a real checkpoint, which the trial then evaluates, as after a Ray Train run.
TINY_STUDY = {"base": "demo", "arms": {"lambda0": ["loss.texture_weight=0"], "x": ["loss.texture_weight=1"]},
              "seeds": [0, 1], "name": "s"}


@pytest.fixture
def tiny_study(tmp_path) -> dict:
    """:data:`TINY_STUDY` evaluated on one 64 x 64 photo (seconds, not minutes, on a busy CPU)."""
    from xswinir.images import read_image, write_image
    from xswinir.sources import resolve_image_files

    write_image(tmp_path / "hr" / "coffee.png", read_image(resolve_image_files("skimage:coffee")[0])[:, :64, :64])
    return {**TINY_STUDY, "eval_sets": [str(tmp_path / "hr")]}


def _train_without_training(study: StudyConfig, arm: str, seed: int, staging: Path) -> Path:
    """A checkpoint folder as a finished run leaves it (an older one first), in the study's storage."""
    import torch

    from tests.s3.endpoint import upload_folder
    from xswinir.checkpoint import save_checkpoint
    from xswinir.model import build_swinir
    from xswinir.paths import filesystem_and_path

    cfg = study.arm_config(arm, seed)
    run = staging / run_name(arm, seed)
    for step, stamp in ((1, "2026-01-01_00-00-00.000001"), (cfg.train.total_steps, "2026-01-01_00-00-09.000001")):
        torch.manual_seed(1000 * seed + step + len(arm))
        model, ema = build_swinir(cfg.model), build_swinir(cfg.model)
        save_checkpoint(run / f"checkpoint_{stamp}", cfg, model, ema, torch.optim.Adam(model.parameters()), step,
                        None)
    if study.storage.startswith("s3://"):
        fs, path = filesystem_and_path(study.run_path(arm, seed))
        upload_folder(fs, run, path)
    return run / f"checkpoint_{stamp}"


def _finished_study(study: StudyConfig, trials: list[tuple[str, int]], staging: Path, monkeypatch) -> list[dict]:
    """Runs :func:`study_trial` for ``trials`` with the training replaced; returns what each reported to Tune."""
    import ray.train
    from ray import tune

    import xswinir.tune.study as study_module

    reports: list[dict] = []
    monkeypatch.setattr(tune, "report", reports.append)
    for arm, seed in trials:
        checkpoint = _train_without_training(study, arm, seed, staging)
        result = SimpleNamespace(checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)))
        monkeypatch.setattr(study_module, "fit_trial", lambda cfg, name, storage, cache, r=result: r)
        study_trial({"arm": arm, "seed": seed}, dataclasses.asdict(study), str(staging / "classifiers"))
    return reports


def test_a_trial_in_a_bucket_writes_its_eval_json_there_bicubic_in_the_baseline_only(tmp_path, bucket, monkeypatch,
                                                                                     tiny_study):
    study = StudyConfig(**tiny_study, storage=f"s3://{bucket}/studies")
    reports = _finished_study(study, [("lambda0", 0), ("x", 0)], tmp_path / "staging", monkeypatch)
    assert [r["done"] for r in reports] == [1, 1] and all(math.isfinite(r["test/psnr_y"]) for r in reports)
    baseline = json.loads(read_file(f"{study.run_path('lambda0', 0)}/{EVAL_FILE}"))
    other = json.loads(read_file(f"{study.run_path('x', 0)}/{EVAL_FILE}"))
    assert [r["kind"] for r in baseline] == ["model", "bicubic"] and [r["kind"] for r in other] == ["model"]
    assert baseline[0]["set"] == str(tmp_path / "hr") and baseline[0]["psnr_y"] != other[0]["psnr_y"]
    assert write_report(study).count("| bicubic | 1 |") == 1  # one seed of bicubic rows, from lambda0_s0


def test_export_models_writes_the_final_ema_weights_that_eval_loads(tmp_path, monkeypatch, capsys, tiny_study):
    import torch
    from safetensors.torch import load_file

    from xswinir.checkpoint import EMA_FILE, load_model
    from xswinir.cli import main

    config = _write_yaml(tmp_path / "s.yaml", yaml.safe_dump({**tiny_study, "storage": str(tmp_path / "studies")}))
    study = load_study_config(config)
    _finished_study(study, [("lambda0", 0), ("lambda0", 1), ("x", 0)], tmp_path / "studies" / "s" / "train",
                    monkeypatch)  # x_s1 has not finished: left out
    assert main(["study", "--config", str(config), "--report-only", "--export-models", str(tmp_path / "models")]) == 0
    assert "models: 3 in" in capsys.readouterr().out
    files = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert files == ["README.md", "lambda0_s0.safetensors", "lambda0_s1.safetensors", "x_s0.safetensors"]

    # The file holds the final checkpoint's EMA weights (not the older checkpoint's, not the raw weights).
    final = sorted(p for p in (tmp_path / "studies" / "s" / "train" / "x_s0").glob("checkpoint_*") if p.is_dir())[-1]
    model, cfg = load_model(tmp_path / "models" / "x_s0.safetensors")
    expected = load_file(final / EMA_FILE)
    assert cfg == dataclasses.replace(study.arm_config("x", 0).model, init_from=None)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())

    # The index: one row per model with its size, sha256 and the study's mean Y-PSNR.
    index = (tmp_path / "models" / "README.md").read_text()
    data = (tmp_path / "models" / "x_s0.safetensors").read_bytes()
    rows = json.loads((tmp_path / "studies" / "s" / "train" / "x_s0" / EVAL_FILE).read_text())
    line = next(x for x in index.splitlines() if x.startswith("| x | 0 |"))
    assert "`loss.texture_weight=1`" in line and "`x_s0.safetensors`" in line
    assert hashlib.sha256(data).hexdigest() in line and f"{len(data) / 1024:,.0f} KiB" in line
    assert f"{rows[0]['psnr_y']:.4f}" in line  # one image in the set: the mean is its value

    # The command the index gives reproduces the study's numbers from the exported file.
    command = next(x.strip() for x in index.splitlines() if x.strip().startswith("xswinir eval"))
    assert command == (f"xswinir eval --checkpoint {tmp_path / 'models'}/lambda0_s0.safetensors --hr {tmp_path / 'hr'} "
                       "--degradation blur-noise --seed 0")
    out = tmp_path / "again.json"
    assert main([*command.replace("lambda0_s0", "x_s0").split()[1:], "--out", str(out), "--device", "cpu"]) == 0
    again = json.loads(out.read_text())["images"]
    assert [r["psnr_y"] for r in again] == pytest.approx([r["psnr_y"] for r in rows], abs=1e-6)


def test_export_refuses_a_damaged_final_checkpoint(tmp_path):
    from xswinir.checkpoint import EMA_FILE
    from xswinir.tune.study import export_models

    study = StudyConfig(**TINY_STUDY, storage=str(tmp_path / "studies"))
    checkpoint = _train_without_training(study, "lambda0", 0, tmp_path / "studies" / "s" / "train")
    (Path(study.run_path("lambda0", 0)) / EVAL_FILE).write_text("[]")
    data = bytearray((checkpoint / EMA_FILE).read_bytes())
    data[-1] ^= 0xFF
    (checkpoint / EMA_FILE).write_bytes(bytes(data))
    with pytest.raises(StudyStorageError, match=r"the final checkpoint of lambda0_s0, .*checkpoint_2026-01-01_00-00-09"
                                                r".* cannot be exported: model_ema.safetensors does not match"):
        export_models(study, str(tmp_path / "models"))
    assert not (tmp_path / "models").exists()


def test_export_from_a_bucket_into_a_bucket(tmp_path, s3_server, bucket, monkeypatch, tiny_study):
    from xswinir.checkpoint import load_model
    from xswinir.tune.study import export_models

    study = StudyConfig(**tiny_study, storage=f"s3://{bucket}/studies")
    _finished_study(study, [("x", 1)], tmp_path / "staging", monkeypatch)
    models = export_models(study, f"s3://{bucket}/models/")
    assert [(m.arm, m.seed, m.location) for m in models] == [("x", 1, f"s3://{bucket}/models/x_s1.safetensors")]
    assert _keys(s3_server, bucket, "models") == ["README.md", "x_s1.safetensors"]
    model, _ = load_model(models[0].location)  # downloaded from the bucket
    assert model.upscale == 2
    assert models[0].sha256 in read_file(f"s3://{bucket}/models/README.md").decode()


class _Touch:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.marker),)
