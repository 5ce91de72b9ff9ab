"""Shared fixtures: a tiny embedded-default experiment whose DDPM/classifier are pretrained once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def tiny_config(root: Path) -> dict:
    """A digits experiment small enough to pretrain and fine-tune in seconds on 2 cores."""
    return {
        "name": "tiny",
        "seed": 0,
        "data": {"dataset": "digits", "resolution": 8},
        "pretrain": {
            "steps": 80,
            "batch_size": 32,
            "lr": 0.002,
            "lr_warmup": 10,
            "block_out_channels": [16, 32],
            "classifier_steps": 80,
            "cache_dir": str(root / "cache"),
        },
        "sampler": {"name": "ddim", "timesteps": 3},
        "features": {"train": "classifier", "eval": "classifier"},
        "kernel": {"type": "polynomial"},
        "finetune": {"steps": 4, "batch_size": 8, "lr": 1.0e-4, "eval_every": 2, "threads": 1},
        "eval": {"num_samples": 48, "batch_size": 48, "kid_subsets": 2, "kid_subset_size": 24},
        "search": {
            "num_samples": 3,
            "scheduler": "fifo",
            "space": {
                "finetune.lr": {"loguniform": [1.0e-5, 1.0e-3]},
                "sampler.timesteps": {"choice": [2, 3]},
            },
        },
        "resources": {"num_workers": 1, "cpus_per_worker": 0.5, "trial_cpus": 0.25},
        "output": {"dir": str(root / "results"), "name": "sweep"},
    }


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding ``tiny.yaml`` with the pretrained model already in its cache."""
    from mmdsweep.config import load_experiment
    from mmdsweep.pretrain import run_pretrain

    root = tmp_path_factory.mktemp("tiny")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(root)))
    run_pretrain(load_experiment(path), show_progress=False)
    return root


@pytest.fixture()
def tiny_yaml(tiny_root: Path, tmp_path: Path) -> Path:
    """A per-test copy of the tiny experiment (own output dir, shared pretrain cache)."""
    cfg = tiny_config(tiny_root)
    cfg["output"]["dir"] = str(tmp_path / "results")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
