"""What a sweep and a study share, without Ray: the paths a trial reads made absolute, and the metrics a trial
resumed into a finished run reports again (the Ray runs: tests/integration/)."""

from __future__ import annotations

from xswinir.config import load_config
from xswinir.training_log import MetricsWriter
from xswinir.tune.launch import absolute_path_overrides, latest_validation


def test_every_local_path_a_trial_reads_becomes_absolute(tmp_path, monkeypatch):
    for folder in ("gt", "lq", "val", "clf"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo", ["data.train=gt;skimage:grass", "data.train_lq=lq", "data.val=val",
                               "texture.classifier.path=clf"])
    assert absolute_path_overrides(cfg) == {
        "data.train": f"{tmp_path / 'gt'};skimage:grass", "data.train_lq": str(tmp_path / "lq"),
        "data.val": str(tmp_path / "val"), "texture.classifier.path": str(tmp_path / "clf")}
    # URIs, skimage: sources, paths that exist nowhere and absolute paths stay as they are.
    cfg = load_config("demo", ["data.train=s3://bucket/hr", "data.val=skimage:val", "data.train_lq=missing",
                               f"texture.classifier.path={tmp_path / 'clf'}"])
    assert absolute_path_overrides(cfg) == {}


def test_latest_validation_reads_the_last_val_row_of_a_metrics_file(tmp_path):
    """What a trial resumed into a finished Train run reports when Ray's snapshot was set aside."""
    writer = MetricsWriter(tmp_path, 0)
    writer.write(2, {"val/psnr_y": 20.0, "val/ssim_y": 0.5})
    writer.write(4, {"train/loss": 0.1})
    writer.write(4, {"val/psnr_y": 21.5, "val/ssim_y": 0.6})
    writer.close()
    assert latest_validation(tmp_path / "metrics.jsonl") == {"step": 4, "val/psnr_y": 21.5, "val/ssim_y": 0.6}
    assert latest_validation(tmp_path / "missing.jsonl") == {}
