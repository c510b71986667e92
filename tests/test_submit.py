"""``xswinir submit`` and the cluster configs: entrypoint building, YAML checks (the real Ray Jobs round trip:
tests/integration/test_submit_ray.py)."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from xswinir.cli import COMMANDS
from xswinir.cli.submit import SubmitError, build_entrypoint, load_runtime_env
from xswinir.config import resolve_config_path

CLUSTER = REPO_ROOT / "cluster"


def test_entrypoint_makes_local_storage_absolute(tmp_path):
    entrypoint, has_storage = build_entrypoint(
        ["--", "train", "--config", "demo", "--storage", "runs", "--set", "train.lr=1e-3"], cwd=tmp_path
    )
    assert has_storage
    assert shlex.split(entrypoint) == [
        "xswinir", "train", "--config", "demo", "--storage", str(tmp_path / "runs"), "--set", "train.lr=1e-3",
    ]


def test_entrypoint_storage_forms(tmp_path):
    entry, _ = build_entrypoint(["train", "--storage=out/r"], cwd=tmp_path)
    assert shlex.split(entry)[-1] == f"--storage={tmp_path / 'out' / 'r'}"
    entry, _ = build_entrypoint(["train", "--set", "run.storage=r"], cwd=tmp_path)
    assert shlex.split(entry)[-1] == f"run.storage={tmp_path / 'r'}"
    entry, has_storage = build_entrypoint(["tune", "--storage", "s3://bucket/sweeps"], cwd=tmp_path)
    assert shlex.split(entry)[-1] == "s3://bucket/sweeps" and has_storage
    _, has_storage = build_entrypoint(["train", "--config", "demo"], cwd=tmp_path)
    assert not has_storage


def test_entrypoint_quotes_arguments(tmp_path):
    entry, _ = build_entrypoint(["train", "--set", "run.name=a b; rm -rf x"], cwd=tmp_path)
    assert shlex.split(entry) == ["xswinir", "train", "--set", "run.name=a b; rm -rf x"]


@pytest.mark.parametrize("command", [[], ["--"], ["submit", "--address", "x"]])
def test_entrypoint_rejects(command):
    with pytest.raises(SubmitError):
        build_entrypoint(command)


def test_runtime_env_file_loads_with_absolute_working_dir():
    env = load_runtime_env(str(CLUSTER / "runtime_env.yaml"), str(REPO_ROOT))
    assert env["working_dir"] == str(REPO_ROOT.resolve())
    # Ray wants every env var as a string; YAML would make `1` an int.
    assert env["env_vars"]["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert ".git" in env["excludes"]


def test_runtime_env_errors(tmp_path):
    with pytest.raises(SubmitError, match="does not exist"):
        load_runtime_env(str(tmp_path / "missing.yaml"), ".")
    with pytest.raises(SubmitError, match="working directory"):
        load_runtime_env(None, str(tmp_path / "nowhere"))


def test_cluster_launcher_yaml_matches_ray_schema():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    assert any("pip install" in c and "/home/ray/xswinir" in c for c in config["setup_commands"])
    # file_mounts copy the repository (".") that setup_commands install
    assert config["file_mounts"] == {"/home/ray/xswinir": "."}


def _check_xswinir_entrypoint(entrypoint: str) -> None:
    args = shlex.split(entrypoint)
    assert args[0] == "xswinir" and args[1] in COMMANDS
    if "--config" in args:
        assert resolve_config_path(args[args.index("--config") + 1]).is_file()


@pytest.mark.parametrize("name", ["rayjob-train.yaml", "rayjob-sweep.yaml"])
def test_rayjob_manifests(name):
    job = yaml.safe_load((CLUSTER / name).read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert set(spec) <= {
        "entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
        "activeDeadlineSeconds", "rayClusterSpec", "submissionMode", "submitterPodTemplate", "suspend",
        "clusterSelector", "entrypointNumGpus", "entrypointNumCpus", "backoffLimit",
    }
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
    _check_xswinir_entrypoint(spec["entrypoint"])


def test_dockerfile_copies_existing_paths():
    sources = []
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY"):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            sources.extend(parts[:-1])
    assert sources
    missing = [s for s in sources if not (REPO_ROOT / s).exists()]
    assert not missing, f"cluster/Dockerfile copies missing paths {missing}"


def test_cluster_readme_commands_exist():
    text = (CLUSTER / "README.md").read_text()
    for path in re.findall(r"cluster/[\w.-]+\.(?:yaml|md)|cluster/Dockerfile", text):
        assert (REPO_ROOT / path).exists(), path


def test_unreachable_address_is_a_one_line_error():
    port = _free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "xswinir", "submit", "--address", f"http://127.0.0.1:{port}", "--", "train"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )
    assert proc.returncode == 2
    assert "cannot reach the Ray job server" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
