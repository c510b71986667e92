"""A study with its storage in a bucket, on real Ray: interrupted, refused when tampered with, resumed to its end.

Two arms x two seeds of a tiny model, one trial at a time, everything in a bucket of a local S3 server
(``tests/s3/endpoint.py``): the Train runs, each trial's ``eval.json``, Tune's experiment state, the signed manifest,
the report, and the exported models.

The interruption is the shared drill's (``tests/integration/interrupt.py``): a Ctrl-C when the first trial
finishes, which Tune's saved state always records as finished (that module says why, from Ray's source). With one
trial at a time, the interrupted study has exactly that trial on record and three left for the resume; the test
reads Tune's state where a resume reads it, in the bucket, instead of trusting the results ``Tuner.fit`` returns.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import yaml

from tests.integration.interrupt import CtrlCAtFirstFinishedTrial
from tests.s3.endpoint import S3Endpoint, list_keys, moto_server, point_at
from xswinir.paths import filesystem_and_path
from xswinir.tune.study import EVAL_FILE, run_name

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def endpoint() -> Iterator[S3Endpoint]:
    with moto_server() as server:
        yield server


@pytest.fixture
def ray_with_aws(endpoint, monkeypatch):
    """A fresh local Ray started from this process with the AWS variables set, stopped after the test.

    The study's trials write to the bucket from Ray's workers, which must see the variables: the shared
    ``ray_local`` was started without them, and is shut down here as ``test_s3_ray.ray_with_aws`` does.
    """
    import ray

    ray.shutdown()
    point_at(endpoint, monkeypatch)
    monkeypatch.setenv("RAY_ADDRESS", "local")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    yield
    ray.shutdown()


def finished_in_storage(experiment: str) -> dict[str, str]:
    """The trials that Tune's newest experiment state in ``experiment`` records as TERMINATED: ``<arm>_s<seed>``
    -> trial id."""
    import pyarrow.fs as pafs

    fs, root = filesystem_and_path(experiment)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    # Ray names them experiment_state-<start time>.json: a resumed experiment writes a newer one.
    states = sorted(i.path for i in infos if i.base_name.startswith("experiment_state-") and i.path.endswith(".json"))
    if not states:
        return {}
    with fs.open_input_stream(states[-1]) as stream:
        state = json.loads(stream.read())
    trials = [json.loads(trial_json) for trial_json, _ in state["trial_data"]]
    return {run_name(t["config"]["arm"], t["config"]["seed"]): t["trial_id"] for t in trials
            if t["status"] == "TERMINATED"}


# 5-10 minutes on 2 busy cores: four tiny trials one after the other (a classifier trained on the fly), over two
# Tune runs.
def test_study_in_a_bucket_interrupted_then_resumed(ray_with_aws, endpoint, tmp_path, monkeypatch, capsys):
    from xswinir.checkpoint import load_model
    from xswinir.cli import main
    from xswinir.errors import UserError
    from xswinir.images import read_image, write_image
    from xswinir.sources import resolve_image_files
    from xswinir.storage import read_file
    from xswinir.tune.manifest import SIGNATURE_FILE, ResumeRefused, verify_signature
    from xswinir.tune.study import (
        MODELS_INDEX,
        STUDY_PLOT,
        STUDY_REPORT,
        STUDY_SUMMARY,
        STUDY_TABLE,
        load_study_config,
        run_study,
    )

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # the manifest's key
    monkeypatch.delenv("XSWINIR_SWEEP_KEY", raising=False)
    bucket = endpoint.new_bucket()
    # A small evaluation set: the trials evaluate it in seconds.
    write_image(tmp_path / "hr" / "coffee.png", read_image(resolve_image_files("skimage:coffee")[0])[:, :64, :64])
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny_s3", "base": "demo",
        "overrides": ["model.depths=[1]", "model.num_heads=[2]", "model.embed_dim=12", "data.gt_size=32",
                      "texture.region_size=64", "texture.classifier.num_pairs=256", "texture.classifier.steps=20",
                      "train.batch_size=2", "train.total_steps=4", "train.val_every=2", "train.warmup_steps=0",
                      "data.val_max_images=1", "run.cpus_per_worker=0.5"],
        "arms": {"lambda0": ["loss.texture_weight=0.0"], "projection": ["loss.texture_weight=1.0"]},
        "seeds": [0, 1], "eval_sets": [str(tmp_path / "hr")], "max_concurrent": 1,
        "storage": f"s3://{bucket}/studies",
    }))
    study = load_study_config(config)
    exp = f"s3://{bucket}/studies/tiny_s3"
    fs = endpoint.filesystem()
    all_trials = {run_name(arm, seed) for arm in study.arms for seed in study.seeds}

    marker = tmp_path / "interrupted"
    first_report = run_study(study, callbacks=[CtrlCAtFirstFinishedTrial(marker)])
    finished = finished_in_storage(exp)
    assert list(finished.values()) == [marker.read_text()], finished  # the trial whose end set off the Ctrl-C
    # The report of the finished trials, and their evaluations, are in the bucket.
    assert read_file(f"{exp}/{STUDY_REPORT}").decode() == first_report
    evaluated = {name: fs.get_file_info(f"{bucket}/studies/tiny_s3/train/{name}/{EVAL_FILE}") for name in finished}
    assert all(info.size > 0 for info in evaluated.values())
    verify_signature(exp)  # signed in the bucket by the interrupted driver
    with pytest.raises(UserError, match="already exists"):
        run_study(study)

    # One changed pickle in the bucket: the resume is refused before anything is unpickled.
    pickle_key = f"{bucket}/studies/tiny_s3/tuner.pkl"
    with fs.open_input_stream(pickle_key) as f:
        original = f.read()
    with fs.open_output_stream(pickle_key) as f:
        f.write(original + b"\n")
    with pytest.raises(ResumeRefused, match="tuner.pkl"):
        run_study(study, resume=True)
    with fs.open_output_stream(pickle_key) as f:
        f.write(original)

    # Resumed from the bucket through the command, then the models exported into the bucket.
    capsys.readouterr()
    assert main(["study", "--config", str(config), "--resume", "--export-models", f"s3://{bucket}/models"]) == 0
    printed = capsys.readouterr().out
    assert set(finished_in_storage(exp)) == all_trials
    verify_signature(exp)  # signed again by the resumed driver
    keys = list_keys(fs, f"{bucket}/studies/tiny_s3")
    assert {STUDY_TABLE, STUDY_REPORT, STUDY_SUMMARY, STUDY_PLOT, SIGNATURE_FILE} <= set(keys)
    assert not [k for k in keys if k.endswith(".tmp")]
    report = read_file(f"{exp}/{STUDY_REPORT}").decode()
    assert report in printed and "| projection | psnr_y |" in report and "| bicubic | 2 |" in report
    # The trials finished before the interruption were neither trained nor evaluated again.
    for name, info in evaluated.items():
        assert fs.get_file_info(f"{bucket}/studies/tiny_s3/train/{name}/{EVAL_FILE}").mtime == info.mtime, name
    for name in all_trials:
        rows = json.loads(read_file(f"{exp}/train/{name}/{EVAL_FILE}"))
        assert {r["kind"] for r in rows} == ({"model", "bicubic"} if name.startswith("lambda0") else {"model"})

    assert list_keys(fs, f"{bucket}/models") == sorted([MODELS_INDEX, *(f"{n}.safetensors" for n in all_trials)])
    model, model_cfg = load_model(f"s3://{bucket}/models/projection_s1.safetensors")
    assert model_cfg.embed_dim == 12 and model.upscale == 2

    # --report-only reads the bucket and writes the same report.
    assert main(["study", "--config", str(config), "--report-only"]) == 0
    assert read_file(f"{exp}/{STUDY_REPORT}").decode() == report
