"""Resources checked against the machine (or the Ray cluster) that would run (issue 10, fault 3, part 2).

Before, ``use_gpu`` with 8 GPUs per worker, ``finetune.device: cuda`` without CUDA and 64 CPUs per
worker on a small machine all passed ``--dry-run``; now each is one line saying what fits, exit 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_config

from mmdsweep import tune
from mmdsweep.config import from_dict


def _run(tmp: Path, capsys: pytest.CaptureFixture[str], **resources: Any) -> tuple[int, str]:
    cfg = tiny_config(tmp)
    device = resources.pop("device", None)
    if device:
        cfg["finetune"]["device"] = device
    cfg["resources"].update(resources)
    p = tmp / "exp.yaml"
    p.write_text(yaml.safe_dump(cfg))
    rc = tune.main([str(p), "--dry-run"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_gpus_per_worker_beyond_the_machine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    n = torch.cuda.device_count()
    rc, err = _run(tmp_path, capsys, use_gpu=True, gpus_per_worker=8 + n)
    assert rc == 2
    line = _one_line(err)
    assert f"resources.gpus_per_worker: {8 + n} GPUs per worker" in line
    assert f"this machine has {n}" in line and "fit" in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run(tmp_path, capsys, device="cuda")
    assert rc == 2
    line = _one_line(err)
    assert "finetune.device: 'cuda'" in line and "no CUDA device" in line and "'cpu'" in line


def test_cpus_per_worker_beyond_the_machine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cores = os.cpu_count() or 1
    rc, err = _run(tmp_path, capsys, cpus_per_worker=64 * cores, trial_cpus=0.25)
    assert rc == 2
    line = _one_line(err)
    assert f"resources.cpus_per_worker: {64 * cores} CPUs per worker but this machine has {cores}" in line
    assert f"at most {cores - 0.25:g} (1 worker x {cores - 0.25:g}) fit" in line


def test_num_cpus_caps_what_this_machine_offers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run(tmp_path, capsys, num_cpus=2, num_workers=2, cpus_per_worker=1.0, trial_cpus=0.5)
    assert rc == 2
    assert "this machine has 2" in _one_line(err)


def test_a_fitting_trial_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run(tmp_path, capsys)
    assert rc == 0, err


def test_cluster_at_an_address_is_what_counts() -> None:
    """With ``resources.address`` the cluster's totals are used (here given, as ray.cluster_resources() would)."""
    from mmdsweep.assets import checks

    cfg = tiny_config(Path("/tmp"))
    cfg["resources"].update(
        {"address": "10.0.0.1:6379", "use_gpu": True, "gpus_per_worker": 1, "num_workers": 4}
    )
    exp = from_dict(cfg)
    with pytest.raises(
        checks.ContentError, match=r"4 worker\(s\) = 4 but the cluster has 2; at most 2 worker"
    ):
        checks.check_resources(exp, cluster={"CPU": 64.0, "GPU": 2.0})
    assert "has 64 CPU, 8 GPU" in checks.check_resources(exp, cluster={"CPU": 64.0, "GPU": 8.0})
