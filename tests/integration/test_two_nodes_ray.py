"""Two Ray nodes that share nothing but the bucket: a two-worker run, one worker per node, with its data and
checkpoints in a local S3 server; the node where rank 0 trains is removed mid-run, and the run goes on from its
last checkpoint in the bucket on what remains, to the end. Rank 0 logs through the driver's metrics sink, so its
rows reach the driver's log folder from whichever node it runs on, and the workers are handed no local path.

The nodes are ``ray.cluster_utils.Cluster`` processes on this machine: a head without CPUs (the driver, its
metrics sink and Ray Train's controller, as a KubeRay head with ``num-cpus: 0``) and two worker nodes of two
CPUs each. ``run.placement_strategy=SPREAD`` puts one one-CPU worker on each; whichever node holds rank 0 is
removed (never the driver's), and both workers restart on the other.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.s3.endpoint import list_keys, moto_server, point_at
from xswinir.cli import main
from xswinir.config import load_config
from xswinir.images import read_image, write_image
from xswinir.runs import RAY_SNAPSHOT_FILE
from xswinir.sources import resolve_image_files
from xswinir.training_log import METRICS_FILE, read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOTAL_STEPS = 12  # checkpoints every 2 steps: the first is registered with steps to spare
TINY = [
    "model.depths=[1]", "model.num_heads=[2]", "model.embed_dim=12", "model.window_size=4", "data.gt_size=32",
    "data.loader_workers=0", "data.val=skimage:coins", "train.batch_size=4", "train.log_every=2",
    "train.val_every=2", "loss.texture_weight=0", "run.progress=false", "run.keep_checkpoints=10",
]


def _checkpoint_count(fs, run: str) -> int:
    return len({key.split("/")[0] for key in list_keys(fs, run) if key.endswith("/manifest.json")})


def _registered_checkpoint(fs, run: str) -> str | None:
    """The latest checkpoint Ray Train has registered (its run snapshot names it), None before the first.

    A checkpoint in the bucket is not yet one a restart resumes from: Ray registers it once every rank has
    reported it. A node lost between the upload and the registration restarts the run from the checkpoint
    before (here: from step 0), which is right, but is not the drill.
    """
    try:
        with fs.open_input_stream(f"{run}/{RAY_SNAPSHOT_FILE}") as f:
            state = json.loads(f.read())
    except (OSError, ValueError):  # not written yet, or caught half-written
        return None
    return (state.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")


# 6.4 minutes on the 2 shared cores under a load average of 37 (2026-12-06), less on an idle machine: a cluster of
# three nodes' worth of Ray, a worker group started twice.
def test_losing_rank_0s_node_mid_run_continues_from_the_bucket_on_what_remains(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from xswinir import trainer

    ray.shutdown()  # the shared Ray of earlier tests: this run joins a cluster of its own
    loop_configs: list[dict] = []
    build_trainer = trainer.build_trainer

    def recording(cfg, loop_config, callbacks=None):  # what the workers are handed, as fit() builds it
        loop_configs.append(loop_config)
        return build_trainer(cfg, loop_config, callbacks)

    monkeypatch.setattr(trainer, "build_trainer", recording)
    with moto_server() as endpoint:
        point_at(endpoint, monkeypatch)  # before the nodes start: they inherit the AWS variables
        bucket = endpoint.new_bucket()
        for path in resolve_image_files("skimage:astronaut,coffee,chelsea"):
            write_image(tmp_path / "hr" / f"{path.stem}.png", read_image(path)[:, :96, :96])
        assert main(["pack", str(tmp_path / "hr"), f"s3://{bucket}/shards", "--no-progress", "--workers", "1"]) == 0

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        workers = {node.node_id: node for node in (cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2))}
        cluster.wait_for_nodes()
        outcome: dict = {}
        try:
            ray.init(address=cluster.address)  # fit() joins this connection (run.address names the cluster too)
            driver_node = ray.get_runtime_context().get_node_id()
            assert driver_node == cluster.head_node.node_id  # Ray connects a driver to the head of its host
            cfg = load_config("demo", [
                *TINY, "run.num_workers=2", "run.cpus_per_worker=1", "run.placement_strategy=SPREAD",
                f"run.address={cluster.address}", f"train.total_steps={TOTAL_STEPS}",
                f"data.train=s3://{bucket}/shards", f"run.storage=s3://{bucket}/runs", "run.name=two-nodes",
                f"run.log_dir={tmp_path / 'logs'}",
            ])

            def train() -> None:
                try:
                    outcome["result"] = trainer.fit(cfg)
                except Exception as err:  # reported by the assertion below, with the run's own message
                    outcome["error"] = err

            # The run in a thread: nodes can only be removed from the main thread (Ray sets signal handlers).
            thread = threading.Thread(target=train, daemon=True)
            thread.start()
            fs, run, metrics = endpoint.filesystem(), f"{bucket}/runs/two-nodes", tmp_path / "logs" / METRICS_FILE
            deadline = time.time() + 300
            first_node = None
            while time.time() < deadline and thread.is_alive():
                rows = read_metrics(metrics)
                if rows and _registered_checkpoint(fs, run) is not None:
                    first_node = rows[0]["node"]  # where rank 0 trains
                    break
                time.sleep(0.2)
            lost = thread.is_alive() and first_node in workers
            if lost:  # rank 0's machine goes; nothing replaces it
                cluster.remove_node(workers[first_node], allow_graceful=False)
            thread.join(timeout=600)
        finally:
            ray.shutdown()
            cluster.shutdown()
        assert "error" not in outcome, outcome.get("error")
        result = outcome["result"]
        assert lost, f"the run ended before rank 0's node could be removed (rank 0 on {first_node})"
        assert result.error is None and result.metrics["step"] == TOTAL_STEPS
        rows = [r for r in read_metrics(tmp_path / "logs" / METRICS_FILE) if "train/loss" in r]
        steps = [r["step"] for r in rows]
        assert steps == sorted(set(steps)) and steps[-1] == TOTAL_STEPS  # continuous, nothing done twice
        # Rank 0 logged from the lost node, then from the one that remained; never from the driver's, and every
        # row is in the driver's log folder.
        (remaining,) = set(workers) - {first_node}
        nodes = [r["node"] for r in rows]
        assert nodes[0] == first_node and nodes[-1] == remaining and set(nodes) == {first_node, remaining}
        assert nodes == sorted(nodes, key=[first_node, remaining].index)
        # The worker loop started twice (one TensorBoard file per start): the run was restarted, not finished.
        assert len(list((tmp_path / "logs" / "tensorboard").glob("events.out.tfevents.*"))) == 2
        assert _checkpoint_count(endpoint.filesystem(), f"{bucket}/runs/two-nodes") >= 2
        # Data, storage, checkpoint and logs: nothing a worker is handed names a folder on some machine's disk.
        (loop_config,) = loop_configs
        assert trainer.local_paths(loop_config) == [] and "log_dir" not in loop_config
        assert loop_config["config"]["run"]["log_dir"] is None
