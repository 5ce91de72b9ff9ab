"""Offline checks of cluster.yaml and cluster-local.yaml with Ray's own config validation.

``ray up`` prepares a config (merges the provider's defaults.yaml, setup commands,
min/max workers) and validates it against Ray's JSON schema before contacting any
cloud API; these tests run exactly those two offline steps, then check what the
sweeps rely on.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
AWS_YAML = ROOT / "cluster.yaml"
LOCAL_YAML = ROOT / "cluster-local.yaml"
IMAGE = "rayproject/ray:2.60.0-py311-gpu"


def load(path: Path) -> dict[str, Any]:
    """The YAML file as a dict."""
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict)
    return config


def prepared(config: dict[str, Any]) -> dict[str, Any]:
    """Prepare and validate a config the way ``ray up`` does before going online."""
    ready = prepare_config(copy.deepcopy(config))
    validate_config(ready)
    return ready


@pytest.fixture(scope="module")
def aws() -> dict[str, Any]:
    return prepared(load(AWS_YAML))


@pytest.fixture(scope="module")
def local() -> dict[str, Any]:
    return prepared(load(LOCAL_YAML))


def worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Node types other than the head's."""
    return {
        name: spec
        for name, spec in config["available_node_types"].items()
        if name != config["head_node_type"]
    }


def test_aws_config_is_valid_and_on_aws(aws: dict[str, Any]) -> None:
    assert aws["cluster_name"] == "mmdsweep"
    assert aws["provider"]["type"] == "aws"
    assert aws["provider"]["region"] == "us-west-2"
    assert aws["provider"]["cache_stopped_nodes"] is False
    assert aws["idle_timeout_minutes"] > 0


def test_aws_gpu_worker_types(aws: dict[str, Any]) -> None:
    workers = worker_types(aws)
    by_instance = {spec["node_config"]["InstanceType"]: spec for spec in workers.values()}
    assert set(by_instance) == {"g5.12xlarge", "p4d.24xlarge"}
    assert by_instance["g5.12xlarge"]["resources"]["GPU"] == 4
    assert by_instance["p4d.24xlarge"]["resources"]["GPU"] == 8
    for spec in workers.values():
        assert spec["min_workers"] == 0 and spec["max_workers"] >= 1
        assert "IamInstanceProfile" in spec["node_config"]  # workers write checkpoints to S3
    assert all(spec["max_workers"] <= aws["max_workers"] for spec in workers.values())


def test_aws_spot_for_g5_on_demand_for_p4d(aws: dict[str, Any]) -> None:
    by_instance = {
        spec["node_config"]["InstanceType"]: spec["node_config"] for spec in worker_types(aws).values()
    }
    assert by_instance["g5.12xlarge"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in by_instance["p4d.24xlarge"]


def test_aws_head_is_cpu_only_and_runs_the_driver(aws: dict[str, Any]) -> None:
    head = aws["available_node_types"][aws["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] >= 1
    assert head["max_workers"] == 0
    assert head["node_config"]["InstanceType"].startswith("m5.")


@pytest.mark.parametrize("name", ["aws", "local"])
def test_docker_image_and_gpu_run_options(name: str, request: pytest.FixtureRequest) -> None:
    docker = request.getfixturevalue(name)["docker"]
    assert docker["image"] == IMAGE
    assert "ray-ml" not in str(docker)
    assert "--gpus all" in docker["worker_run_options"]
    assert any(opt.startswith("--shm-size") for opt in docker["worker_run_options"])
    assert "--gpus all" not in docker.get("run_options", [])  # the head may have no GPU


@pytest.mark.parametrize("name", ["aws", "local"])
def test_setup_installs_project_and_torch_on_every_node(name: str, request: pytest.FixtureRequest) -> None:
    config = request.getfixturevalue(name)
    assert config["file_mounts"]["/home/ray/mmdsweep"] == "."
    for key in ("head_setup_commands", "worker_setup_commands"):  # merged by prepare_config
        commands = " && ".join(config[key])
        assert "pip install" in commands
        assert "-e /home/ray/mmdsweep" in commands
        assert "torch==" in commands
        assert "ray[default,train,tune]==2.60.0" in commands


def test_aws_head_installs_boto3_for_the_autoscaler(aws: dict[str, Any]) -> None:
    assert any("boto3" in command for command in aws["head_setup_commands"])


def test_local_config_has_placeholders_and_one_node_type(local: dict[str, Any]) -> None:
    raw = load(LOCAL_YAML)
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    assert "available_node_types" not in raw  # the local provider derives its own
    (node_type,) = local["available_node_types"].values()
    assert node_type["max_workers"] == len(raw["provider"]["worker_ips"])


@pytest.mark.parametrize("path", [AWS_YAML, LOCAL_YAML], ids=["aws", "local"])
def test_unknown_top_level_key_fails_validation(path: Path) -> None:
    config = load(path)
    config["max_worker"] = 3  # typo of max_workers
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        prepared(config)


def test_unknown_node_type_key_fails_validation() -> None:
    config = load(AWS_YAML)
    g5 = next(
        s
        for s in config["available_node_types"].values()
        if s["node_config"]["InstanceType"] == "g5.12xlarge"
    )
    g5["min_worker"] = 1  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        prepared(config)


def test_wrong_type_fails_validation() -> None:
    config = load(AWS_YAML)
    config["docker"]["run_options"] = "--gpus all"  # must be a list
    with pytest.raises(jsonschema.ValidationError):
        prepared(config)


def test_validation_does_not_need_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("config validation tried to open a connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    prepared(load(AWS_YAML))
    prepared(load(LOCAL_YAML))
