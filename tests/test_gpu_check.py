"""bench/gpu_check.py in its CI-sized CPU form: the record it writes, the timed step, the test runner.

The GPU machine has no Ray and no Optuna: the check runs here with both made unimportable.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.bench_texture import make_classifier

ORIGINAL = Path(__file__).resolve().parents[1] / "third_party" / "swinir"


def test_cpu_quick_check_writes_the_whole_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises, as on the GPU machine
    monkeypatch.setitem(sys.modules, "optuna", None)
    with_original = (ORIGINAL / "network_swinir.py").is_file()  # fetched, never committed (README, Benchmarks)
    argv = ["--cpu", "--quick", "--no-tests", "--workers", "1", "--out", str(tmp_path)]
    assert gpu_check.main(argv + (["--original", str(ORIGINAL)] if with_original else [])) == 0

    record = json.loads((tmp_path / gpu_check.JSON_NAME).read_text())
    sections = record["sections"]
    assert list(sections) == ["environment", "sdpa", "train", "model", "goals"]
    assert all(s.get("status", "ok") == "ok" for s in sections.values())
    assert sections["environment"]["ray_imported"] is False
    assert sections["environment"]["versions"]["kornia"]

    for row in sections["sdpa"]["rows"]:
        assert row["ok"] and row["ms"] > 0 and row["bias_grad_rel_diff"] < 1e-5, row

    train = sections["train"]
    for name, variant in train["variants"].items():
        expected = set(gpu_check.PARTS) - ({"texture_search", "texture_term"} if name == "lambda0" else set())
        parts = variant["parts_ms"]
        assert set(parts) == expected
        assert all(ms > 0 for ms in parts.values()), parts
        # The step is timed on its own, around the parts: they must make it up, none left out or counted twice.
        assert variant["parts_sum_ms"] == pytest.approx(variant["step_ms"], rel=0.05)
        for key in ("steps_per_s", "demand_crops_per_s", "supply_crops_per_s", "model_gflop_per_step",
                    "tflops_model", "tflops_step"):
            assert variant[key] > 0, key
        assert variant["loss_finite"] and variant["batch"] == 2 and variant["precision"] == "fp32"
    assert train["variants"]["texture"]["texture_weight"] == 1.0
    assert train["variants"]["lambda0"]["texture_weight"] == 0.0
    assert 0 < train["degradation_share"] < 1 and 0 < train["texture_search_share"] < 1
    assert train["loader_workers_needed"] > 0 and train["variants"]["texture"]["loader_workers"] == 1

    for precision in ("fp32", "bf16"):
        rows = sections["model"][precision]["rows"]
        assert [(r["model"], r["task"]) for r in rows] == [
            ("tiny-x2", "forward"), ("tiny-x2", "forward+backward"), ("tiny-x2", "forward")]
        assert all(r["ours img/s"] > 0 for r in rows)
        if with_original:
            assert all(r["speedup"] > 0 and r["max |diff|"] <= 1e-4 for r in rows)

    goals = sections["goals"]["rows"]
    assert record["rows"] == goals and len(goals) == 4
    assert {g["status"] for g in goals[2:]} <= {"met", "missed"}
    assert {g["status"] for g in goals[:2]} <= ({"met", "missed"} if with_original else {"not measured"})
    # Everything printed is in the JSON too.
    for text in ("== train", "training step by parts", "issue 11 goals", "every section ran"):
        assert text in record["log"]


def test_timed_step_is_the_trainers_step(one_torch_thread_per_test: None) -> None:
    from xswinir.data import build_train_batches
    from xswinir.trainer import build_training_parts

    cfg = gpu_check.train_config(quick=True, workers=0, source="skimage:train", texture_weight=1.0)
    batch = next(build_train_batches(cfg, rank=0, world_size=1))
    classifier = make_classifier(cfg.texture.patch_size, batch["region"])
    cpu = torch.device("cpu")
    results = []
    for timeline in (None, gpu_check.StepTimeline(cpu)):
        parts = build_training_parts(cfg, cpu, classifier)
        with timeline.attached(parts) if timeline else contextlib.nullcontext():
            out = gpu_check.timed_run_step(parts, cfg, 3, iter([batch]), cpu, None, timeline)
        results.append((out, [p.detach().clone() for p in parts.ema.module.parameters()]))
    # The hooks only watch: the same loss, diagnostics and EMA weights as the trainer's plain step.
    (plain, plain_ema), (timed, timed_ema) = results
    assert plain.keys() == timed.keys()
    for key in plain:
        torch.testing.assert_close(timed[key], plain[key], rtol=0, atol=0)
    for a, b in zip(timed_ema, plain_ema, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert set(timeline.steps[0]) == set(gpu_check.PARTS)
    # ... and are gone afterwards.
    assert not parts.model._forward_hooks and not parts.degrader._forward_pre_hooks
    assert "search" not in vars(parts.loss_fn) and "update" not in vars(parts.ema)


def test_gpu_tests_are_found_and_counted(tmp_path: Path) -> None:
    files = gpu_check.gpu_test_files()
    assert "tests/test_model.py" in files and "tests/test_config.py" not in files
    assert "tests/test_gpu_check.py" not in files  # the mark below is in a string, not on a test
    assert not any(f.startswith("tests/integration/") for f in files)  # they start Ray

    test_file = tmp_path / "test_sample.py"
    test_file.write_text(
        "import pytest\n\n"
        "@pytest.mark.gpu\ndef test_passes():\n    pass\n\n"
        "@pytest.mark.gpu\ndef test_fails():\n    assert 1 == 2, 'planted'\n\n"
        "def test_not_gpu():\n    pass\n"
    )
    broken = tmp_path / "test_broken.py"  # a file that needs what the GPU machine lacks
    broken.write_text("import ray_is_not_here\n")
    result = gpu_check.gpu_tests(tmp_path, timeout_s=120, files=[str(test_file), str(broken)])
    # The file that cannot be collected is an error; the other file's tests still ran.
    assert result["counts"] == {"passed": 1, "failed": 1, "error": 1, "skipped": 0}
    assert result["status"] == "failed" and result["returncode"] == 1
    failed = next(t for t in result["tests"] if t["outcome"] == "failed")
    assert failed["test"].endswith("::test_fails") and "planted" in failed["message"]
