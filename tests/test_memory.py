"""``mmdsweep.train.memory``: the per-worker estimate behaves as the components it adds, and matches
the activations autograd really saves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from scale_fixture import tiny_experiment, tiny_setup

from mmdsweep.core.sampling import select_timesteps
from mmdsweep.train.memory import (
    GPU_MEMORY_MIB,
    KNOWN_UNET_CONFIGS,
    estimate,
    per_image_activation_mib,
    saved_activation_bytes,
    unet_config,
)


def _exp(**kw: object):
    return tiny_experiment(**{"pretrain.block_out_channels": [16, 32], **kw})  # type: ignore[arg-type]


def test_saved_bytes_deduplicate_storages_and_skip_parameters() -> None:
    lin = torch.nn.Linear(64, 64)

    def fn(b: int) -> torch.Tensor:
        x = torch.randn(b, 64, requires_grad=True)
        h = lin(x)
        return (h * h).sum() + (h * 2).sum()  # h saved once (by mul), x saved by linear

    exclude = {p.untyped_storage().data_ptr() for p in lin.parameters()}
    got = saved_activation_bytes(fn, 10, exclude)
    assert got == 2 * 10 * 64 * 4  # x and h, each once; the weight is not counted
    const, per_image = per_image_activation_mib(lin, fn)
    assert per_image == pytest.approx(2 * 64 * 4 / 2**20)


def test_components_move_the_way_they_should() -> None:
    base = estimate(_exp(**{"finetune.batch_size": 16, "sampler.timesteps": 4}))
    assert base is not None
    no_ckpt = estimate(
        _exp(**{"finetune.batch_size": 16, "sampler.timesteps": 4, "sampler.checkpointing": False})
    )
    assert no_ckpt is not None
    assert no_ckpt.unet_activations == pytest.approx(4 * base.unet_activations, rel=0.02)
    micro = estimate(
        _exp(**{"finetune.batch_size": 16, "finetune.micro_batch_size": 4, "sampler.timesteps": 4})
    )
    assert micro is not None and micro.unet_activations < 0.3 * base.unet_activations
    assert micro.weights == base.weights and micro.optimizer == base.optimizer
    lora = estimate(_exp(**{"finetune.batch_size": 16, "finetune.adapter": "lora"}))
    assert lora is not None and lora.trainable < base.trainable / 3 and lora.optimizer < base.optimizer / 3
    bf16 = estimate(_exp(**{"finetune.batch_size": 16, "finetune.precision": "bf16"}))
    assert bf16 is not None and bf16.unet_activations < 0.8 * base.unet_activations
    # a learned grid alone: T trainable numbers, no weight gradients or Adam state, the same activations
    grid = estimate(
        _exp(**{"finetune.batch_size": 16, "sampler.timesteps": 4, "finetune.train": "timesteps"})
    )
    assert grid is not None and grid.trainable == 4 and grid.grads < 1e-3 and grid.optimizer < 1e-3
    assert grid.unet_activations == base.unet_activations and grid.weights == base.weights


def test_estimate_matches_the_activations_of_a_real_step() -> None:
    """Without checkpointing the chain keeps T UNet calls' activations: the estimate must match the bytes
    autograd saves in a real chain (within 25%: sampler arithmetic and the feature map are not in the
    per-call probe)."""
    from mmdsweep.train.loop import generate_features

    exp = _exp(**{"finetune.batch_size": 8, "sampler.timesteps": 3, "sampler.checkpointing": False})
    setup = tiny_setup(exp)
    unet = setup.denoiser.unet
    exclude = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    ts = select_timesteps(3, 1000)
    measured = (
        saved_activation_bytes(
            lambda b: generate_features(setup, setup.denoiser.eps_fn(unet), 0, ts, 0, b), 8, exclude
        )
        / 2**20
    )
    est = estimate(exp, config=dict(unet.config))
    assert est is not None
    assert est.unet_activations == pytest.approx(measured, rel=0.25)


def test_known_hub_configs_and_fit_verdicts() -> None:
    exp = tiny_experiment(
        **{
            "model.source": "diffusers",
            "model.path": "google/ddpm-cifar10-32",
            "data.resolution": 32,
            "features.train": "torchvision:mobilenet_v2",
            "finetune.batch_size": 64,
        }
    )
    cfg = unet_config(exp)
    assert cfg == KNOWN_UNET_CONFIGS["google/ddpm-cifar10-32"]
    est = estimate(exp, config=cfg, gpu_type="H200")
    assert est is not None and 35e6 < est.params < 36e6 and est.fits()
    huge = estimate(exp.with_overrides({"finetune.batch_size": 4096}), config=cfg, gpu_type="A10G")
    assert huge is not None and huge.fits() is False and huge.total > GPU_MEMORY_MIB["A10G"]
    assert any("DOES NOT FIT" in line for line in huge.lines())


def test_dry_run_prints_the_estimate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import tiny_config

    from mmdsweep.train.loop import main

    cfg = tiny_config(tmp_path)
    cfg["resources"]["gpu_type"] = "A10G"
    cfg["finetune"]["micro_batch_size"] = 4
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "memory per worker" in out and "A10G" in out and "fits" in out


def test_gpu_check_smoke_runs_on_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu_check.py --smoke: section 5 (step time, peak memory, MFU table) at tiny sizes on the CPU."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    table = (tmp_path / "gpu_check_smoke.md").read_text()
    assert (
        "| T | weights | precision |" in table
        and "| 2 | lora | bf16 |" in table
        and "| 2 | none | fp32 |" in table
    )
