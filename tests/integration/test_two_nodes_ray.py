"""Two Ray nodes that share nothing but the bucket: a two-worker run, one worker per node, with its data and
checkpoints in a local S3 server; the second node is removed mid-run and a fresh one joins (as an autoscaler or
KubeRay replaces a lost machine), and the run goes on from its last checkpoint in the bucket to the end.

The nodes are ``ray.cluster_utils.Cluster`` processes on this machine, one CPU each, so that the two one-CPU
workers cannot share a node.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.s3.endpoint import list_keys, moto_server, point_at
from xswinir.cli import main
from xswinir.config import load_config
from xswinir.images import read_image, write_image
from xswinir.sources import resolve_image_files
from xswinir.training_log import METRICS_FILE, read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOTAL_STEPS = 8
TINY = [
    "model.depths=[1]", "model.num_heads=[2]", "model.embed_dim=12", "model.window_size=4", "data.gt_size=32",
    "data.loader_workers=0", "data.val=skimage:coins", "train.batch_size=4", "train.log_every=2",
    "train.val_every=2", "loss.texture_weight=0", "run.progress=false", "run.keep_checkpoints=10",
]


def _checkpoint_count(fs, run: str) -> int:
    return len({key.split("/")[0] for key in list_keys(fs, run) if key.endswith("/manifest.json")})


# 2-5 minutes on 2 cores: a cluster of three processes' worth of Ray, a worker group started twice.
def test_losing_a_node_mid_run_continues_from_the_bucket(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from xswinir.trainer import fit

    ray.shutdown()  # the shared Ray of earlier tests: this run joins a cluster of its own
    with moto_server() as endpoint:
        point_at(endpoint, monkeypatch)  # before the nodes start: they inherit the AWS variables
        bucket = endpoint.new_bucket()
        for path in resolve_image_files("skimage:astronaut,coffee,chelsea"):
            write_image(tmp_path / "hr" / f"{path.stem}.png", read_image(path)[:, :96, :96])
        assert main(["pack", str(tmp_path / "hr"), f"s3://{bucket}/shards", "--no-progress", "--workers", "1"]) == 0

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        second = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        outcome: dict = {}
        try:
            ray.init(address=cluster.address)  # fit() joins this connection (run.address names the cluster too)
            cfg = load_config("demo", [
                *TINY, "run.num_workers=2", "run.cpus_per_worker=1", f"run.address={cluster.address}",
                f"train.total_steps={TOTAL_STEPS}", f"data.train=s3://{bucket}/shards",
                f"run.storage=s3://{bucket}/runs", "run.name=two-nodes", f"run.log_dir={tmp_path / 'logs'}",
            ])

            def train() -> None:
                try:
                    outcome["result"] = fit(cfg)
                except Exception as err:  # reported by the assertion below, with the run's own message
                    outcome["error"] = err

            # The run in a thread: nodes can only be added from the main thread (Ray sets signal handlers).
            trainer = threading.Thread(target=train, daemon=True)
            trainer.start()
            fs, run = endpoint.filesystem(), f"{bucket}/runs/two-nodes"
            deadline = time.time() + 300
            while time.time() < deadline and trainer.is_alive() and _checkpoint_count(fs, run) < 1:
                time.sleep(0.2)
            lost = trainer.is_alive()
            if lost:  # the second node goes; a fresh one joins, as an autoscaler or KubeRay replaces a machine
                cluster.remove_node(second, allow_graceful=False)
                cluster.add_node(num_cpus=1)
            trainer.join(timeout=600)
        finally:
            ray.shutdown()
            cluster.shutdown()
        assert "error" not in outcome, outcome.get("error")
        result = outcome["result"]
        assert lost, "the run ended before the second node could be removed"
        assert result.error is None and result.metrics["step"] == TOTAL_STEPS
        steps = [r["step"] for r in read_metrics(tmp_path / "logs" / METRICS_FILE) if "train/loss" in r]
        assert steps == sorted(set(steps)) and steps[-1] == TOTAL_STEPS  # continuous, nothing done twice
        # The worker loop started twice (one TensorBoard file per start): the run was restarted, not finished.
        assert len(list((tmp_path / "logs" / "tensorboard").glob("events.out.tfevents.*"))) == 2
        assert _checkpoint_count(endpoint.filesystem(), f"{bucket}/runs/two-nodes") >= 2
