"""Exported checkpoints load and sample with plain diffusers, identically to our sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmdsweep.assets.models import load_denoiser
from mmdsweep.config import load_experiment
from mmdsweep.core.sampling import sample, select_timesteps
from mmdsweep.inference.export import export_pipeline
from mmdsweep.train.loop import run_finetune
from mmdsweep.train.reporting import LocalReporter


@pytest.fixture(scope="module")
def checkpoint(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import yaml
    from conftest import tiny_config

    d = tmp_path_factory.mktemp("export")
    cfg = tiny_config(tiny_root)
    cfg["output"]["dir"] = str(d / "results")
    (d / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    exp = load_experiment(d / "tiny.yaml").with_overrides({"finetune.steps": 2})
    run_finetune(exp, LocalReporter(d / "run"))
    return d / "run" / "best"


def test_exported_pipeline_samples_like_mmdsweep(checkpoint: Path, tmp_path: Path) -> None:
    from diffusers import DDIMPipeline

    out = export_pipeline(checkpoint, tmp_path / "pipe")
    meta = json.loads((out / "mmdsweep.json").read_text())
    T = meta["num_inference_steps"]
    assert T == 3
    pipe = DDIMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    # the scheduler's T-step schedule is exactly the fine-tuned one
    pipe.scheduler.set_timesteps(T)
    assert pipe.scheduler.timesteps.tolist() == select_timesteps(T, 1000)

    gen = torch.Generator().manual_seed(123)
    theirs = pipe(batch_size=4, generator=gen, num_inference_steps=T, eta=0.0, output_type="np").images
    noise = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(123))
    den = load_denoiser(str(checkpoint))
    with torch.no_grad():
        ours = sample(den.eps_fn(), noise, den.schedule, select_timesteps(T, 1000), sampler="ddim")
    ours_np = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # = final_clamp
    assert theirs.shape == ours_np.shape
    assert np.abs(theirs - ours_np).max() < 1e-4
    # and the samples are not trivially constant
    assert ours_np.std() > 0.05


def test_quadratic_ddim_exports_as_first_order_dpm_solver(checkpoint: Path, tmp_path: Path) -> None:
    """diffusers' DDIMScheduler takes no custom grid; first-order DPM-Solver++ (= DDIM, eta=0) with explicit
    timesteps does (the old code refused every non-leading grid)."""
    custom = tmp_path / "ckpt"
    import shutil

    shutil.copytree(checkpoint, custom)
    state = json.loads((custom / "state.json").read_text())
    state["chain"] = {**state["chain"], "spacing": "quadratic"}
    (custom / "state.json").write_text(json.dumps(state))
    out = export_pipeline(custom, tmp_path / "pipe")
    meta = json.loads((out / "mmdsweep.json").read_text())
    assert meta["scheduler"] == "DPMSolverMultistepScheduler"
    assert meta["custom_timesteps"] == select_timesteps(3, 1000, "quadratic")
    cfg = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["solver_order"] == 1 and cfg["algorithm_type"] == "dpmsolver++"
