"""A small synthetic sweep results directory for the analysis, report, sample and notebook tests.

``build_sweep(root)`` writes, under ``root``::

    sweep/trials.parquet, sweep/metrics.parquet   # mmdsweep.results schema and metadata
    sweep/speed.parquet                           # mmdsweep.inference.speed.write_speed_table
    sweep/evaluation.parquet                      # final protocol (FINAL_FIDS), unless evaluation=False
    sweep/sweep.json, sweep/experiment.yaml
    sweep/exported/T5, sweep/exported/T10         # tiny random UNets, diffusers pipeline layout
                                                  # (T10 with mmdsweep.json, as mmdsweep.inference.export writes)
    sweep/checkpoints/t00                         # a fine-tuning checkpoint (state.json: T=5)
    models/base                                   # the "pretrained" base model
    sweep/optuna.db                               # only with optuna=True

The numbers are chosen so the expected answers are known (see ``BEST_PER_T`` etc.).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import pandas as pd
import pyarrow as pa
import torch

from mmdsweep.assets.models import build_unet, save_denoiser, scheduler_config_for
from mmdsweep.inference.speed import write_speed_table
from mmdsweep.results import METRICS_SCHEMA, atomic_write_table, file_metadata, results_paths, trials_schema

EXPERIMENT = "digits_mmd"
PARAM_TYPES = {
    "finetune.lr": "float",
    "kernel.type": "str",
    "kernel.bandwidth": "float",
    "sampler.timesteps": "int",
}
RESOLUTION = 16
CHANNELS = 3
STEPS = (100, 200, 300)

# trial id -> (T, kernel, lr, bandwidth, status, FIDs at STEPS (shorter list: stopped early))
TRIALS: dict[str, tuple[int, str, float, float | None, str, list[float]]] = {
    "t00": (5, "rbf", 1e-5, 1.0, "completed", [55.0, 48.0, 45.0]),
    "t01": (5, "polynomial", 3e-5, None, "completed", [57.0, 50.0, 47.0]),
    "t02": (5, "imq", 1e-4, 0.8, "diverged", [58.0]),
    "t03": (10, "rbf", 2e-5, 2.0, "completed", [36.0, 31.0, 29.0]),
    "t04": (10, "polynomial", 5e-6, None, "early-stopped", [38.0, 35.0]),
    "t05": (10, "rbf", 1e-4, 0.5, "errored", []),
    "t06": (20, "imq", 1e-5, 1.5, "completed", [25.0, 22.0, 21.0]),
    "t07": (20, "rbf", 3e-6, None, "completed", [26.0, 24.0, 23.5]),
    "t08": (5, "rbf", 2e-6, 3.0, "running", [56.0]),
}
BEST_PER_T = {5: "t00", 10: "t03", 20: "t06"}
BASELINE = {"5": {"fid": 60.0, "kid": 0.05}, "10": {"fid": 41.0, "kid": 0.03}, "20": 30.0}
EXPORTED = (5, 10)
# seconds per image: base model at every T, and the exports (a little faster, to tell them apart)
BASE_SPEED = {5: 0.005, 10: 0.010, 20: 0.020, 50: 0.050}
EXPORT_SPEED = {5: 0.004, 10: 0.009}
T0 = dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
# evaluation.parquet (final protocol, seeds 1, 2, 3): (space, T, kind, trial or sampler/spacing) -> FIDs.
# classifier (primary): T=5 t00 1.0 +- 0.1 vs ddim/leading 2.0 +- 0.1 (better, > 2 std);
#                       T=10 t03 1.9 +- 0.3 vs dpmpp_2m/trailing 2.0 +- 0.1 (within noise).
# inception:            T=5 t00 11.0 +- 1.0 vs ddim/leading 10.5 +- 0.5 (worse by 0.5, within noise);
#                       T=10 t03 20.5 +- 0.5 vs unipc/trailing 31.0 +- 1.0 (better, > 2 std).
FINAL_SEEDS = (1, 2, 3)
FINAL_FIDS: dict[tuple[str, int, str, str], list[float]] = {
    ("classifier", 5, "model", "t00"): [0.9, 1.0, 1.1],
    ("classifier", 5, "baseline", "ddim/leading"): [2.1, 2.0, 1.9],
    ("classifier", 5, "baseline", "unipc/trailing"): [3.0, 3.1, 3.2],
    ("classifier", 10, "model", "t03"): [1.6, 1.9, 2.2],
    ("classifier", 10, "baseline", "dpmpp_2m/trailing"): [1.9, 2.0, 2.1],
    ("classifier", 10, "baseline", "ddim/leading"): [2.5, 2.6, 2.7],
    ("inception", 5, "model", "t00"): [10.0, 11.0, 12.0],
    ("inception", 5, "baseline", "ddim/leading"): [10.0, 10.5, 11.0],
    ("inception", 5, "baseline", "unipc/trailing"): [12.0, 12.5, 13.0],
    ("inception", 10, "model", "t03"): [20.0, 20.5, 21.0],
    ("inception", 10, "baseline", "unipc/trailing"): [30.0, 31.0, 32.0],
    ("inception", 10, "baseline", "dpmpp_2m/trailing"): [33.0, 34.0, 35.0],
    ("classifier", 0, "real", "real/"): [0.7, 0.8, 0.9],  # real training images: the metric's floor
}
FINAL_N = 64
FINAL_REFERENCE = "digits:heldout"


def _trial_rows(sweep_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    trials, metrics = [], []
    for i, (tid, (T, kernel, lr, bw, status, fids)) in enumerate(TRIALS.items()):
        started = T0 + dt.timedelta(minutes=5 * i)
        for j, fid in enumerate(fids):
            metrics.append(
                {
                    "sweep_id": sweep_id,
                    "trial_id": tid,
                    "step": STEPS[j],
                    "loss": math.nan if status == "diverged" else 0.1 / (j + 1),
                    "fid": fid,
                    "kid": fid / 1000,
                    "bandwidth": bw,
                    "lr": lr,
                    "elapsed_s": 60.0 * (j + 1),
                    "timesteps": T,
                    "time": started + dt.timedelta(minutes=j + 1),
                    "sample_time_per_image_s": BASE_SPEED[T],
                }
            )
        best = min(fids) if fids else None
        best_step = STEPS[fids.index(best)] if best is not None else None
        trials.append(
            {
                "sweep_id": sweep_id,
                "trial_id": tid,
                "param.finetune.lr": lr,
                "param.kernel.type": kernel,
                "param.kernel.bandwidth": bw,
                "param.sampler.timesteps": T,
                "status": status,
                "best_fid": best,
                "best_kid": best / 1000 if best is not None else None,
                "final_fid": fids[-1] if fids else None,
                "final_kid": fids[-1] / 1000 if fids else None,
                "best_step": best_step,
                "steps": STEPS[len(fids) - 1] if fids else 0,
                "timesteps": T,
                "wall_time_s": 60.0 * len(fids) if fids else 5.0,
                "num_eval_samples": 256,
                "best_checkpoint": f"/ckpt/{tid}/step_{best_step}" if best_step else None,
                "error": "RuntimeError: CUDA out of memory" if status == "errored" else None,
                "started_at": started,
                "updated_at": started + dt.timedelta(minutes=max(1, len(fids))),
            }
        )
    return trials, metrics


def write_results(results_dir: Path, sweep_id: str) -> None:
    """``trials.parquet`` and ``metrics.parquet`` with mmdsweep's schema and metadata."""
    trials, metrics = _trial_rows(sweep_id)
    paths = results_paths(results_dir)
    tmeta = file_metadata("trials", sweep_id, EXPERIMENT, PARAM_TYPES)
    mmeta = file_metadata("metrics", sweep_id, EXPERIMENT, PARAM_TYPES)
    atomic_write_table(
        pa.Table.from_pylist(trials, schema=trials_schema(PARAM_TYPES).with_metadata(tmeta)), paths.trials
    )
    atomic_write_table(
        pa.Table.from_pylist(metrics, schema=METRICS_SCHEMA.with_metadata(mmeta)), paths.metrics
    )


def _save_model(directory: Path, seed: int, perturb_from: torch.nn.Module | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    unet = cast(
        torch.nn.Module, build_unet(RESOLUTION, CHANNELS, block_out_channels=(8, 16), layers_per_block=1)
    )
    if perturb_from is not None:
        unet.load_state_dict(perturb_from.state_dict())
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.05 * torch.randn_like(p))
    save_denoiser(directory, unet, scheduler_config_for(1000, "linear", 1e-4, 0.02))
    return unet


def write_models(root: Path, results_dir: Path) -> Path:
    """Base model, exports T5/T10 (diffusers DDIMPipeline layout) and one checkpoint dir."""
    base_dir = root / "models" / "base"
    base = _save_model(base_dir, seed=0)
    for T in EXPORTED:
        d = results_dir / "exported" / f"T{T}"
        _save_model(d, seed=T, perturb_from=base)
        index = {
            "_class_name": "DDIMPipeline",
            "_diffusers_version": "0.30.0",
            "scheduler": ["diffusers", "DDIMScheduler"],
            "unet": ["diffusers", "UNet2DModel"],
        }
        (d / "model_index.json").write_text(json.dumps(index, indent=2))
        if T == 10:  # as mmdsweep.inference.export writes it (the T5 export has none: --timesteps needed)
            info = {"num_inference_steps": T, "eta": 0.0, "sampler": "ddim", "spacing": "uniform"}
            (d / "mmdsweep.json").write_text(json.dumps(info, indent=2))
    ckpt = results_dir / "checkpoints" / "t00"
    _save_model(ckpt, seed=5, perturb_from=base)
    (ckpt / "train_state").mkdir(exist_ok=True)
    state = {
        "step": 300,
        "best_fid": 45.0,
        "timesteps": 5,
        "sampler": "ddim",
        "spacing": "uniform",
        "eta": 0.0,
    }
    (ckpt / "state.json").write_text(json.dumps(state, indent=2))
    return base_dir


def evaluation_rows(
    spec: dict[tuple[str, int, str, str], list[float]] | None = None,
    *,
    seeds: Sequence[int] | None = None,
    num_samples: int = FINAL_N,
    base_dir: str = "models/base",
    model_dir: str = "checkpoints",
    kid: Callable[[float], float] = lambda fid: fid / 1000,
    preprocessing: Callable[[str], str | None] = lambda space: f"{space}: resize 16->299 bilinear",
    warnings: Callable[[str, str], str] = lambda space, kind: (
        "inception: N=64 < 2048 features: FID biased" if space == "inception" else ""
    ),
) -> list[dict[str, Any]]:
    """evaluation.parquet rows (one per space x chain x seed) from ``spec``: (space, T, kind, trial id or
    "sampler/spacing") -> FID per seed (default: FINAL_FIDS with FINAL_SEEDS). Fine-tuned models are
    ``<model_dir>/<trial id>`` with sampler ddim/uniform; baselines are ``base_dir``."""
    rows = []
    for (space, T, kind, name), fids in (FINAL_FIDS if spec is None else spec).items():
        sampler, spacing = ("ddim", "uniform") if kind == "model" else name.split("/")
        default_seeds = FINAL_SEEDS if spec is None else range(1, len(fids) + 1)
        for seed, fid in zip(default_seeds if seeds is None else seeds, fids):
            rows.append(
                {
                    "kind": kind,
                    "model": f"{model_dir}/{name}" if kind == "model" else base_dir,
                    "trial_id": name if kind == "model" else None,
                    "sampler": sampler,
                    "spacing": spacing,
                    "timesteps": T,
                    "space": space,
                    "protocol": "final",
                    "seed": seed,
                    "reference": FINAL_REFERENCE,
                    "num_samples": num_samples,
                    "fid": fid,
                    "kid": kid(fid),
                    "preprocessing": preprocessing(space),
                    "warnings": warnings(space, kind),
                }
            )
    return rows


def write_speed(results_dir: Path, sweep_id: str) -> None:
    rows = [
        {"model": "base", "timesteps": T, "seconds_per_image": s, "model_dir": "models/base"}
        for T, s in BASE_SPEED.items()
    ]
    rows += [{"model": f"T{T}", "timesteps": T, "seconds_per_image": s} for T, s in EXPORT_SPEED.items()]
    df = pd.DataFrame(rows)
    df = df.assign(
        sampler="ddim",
        spacing="uniform",
        eta=0.0,
        device="cpu",
        device_name="synthetic",
        dtype="float32",
        batch_size=64,
        num_images=256,
        warmup=1,
        measured_at=T0 + dt.timedelta(hours=2),
    )
    write_speed_table(results_dir, df, sweep_id=sweep_id)


def write_optuna(results_dir: Path, study_name: str) -> str:
    """An Optuna SQLite study with the evaluated trials (as the sweep's OptunaSearch would)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{results_dir / 'optuna.db'}"
    study = optuna.create_study(study_name=study_name, storage=url, direction="minimize")
    dists = {
        "finetune.lr": optuna.distributions.FloatDistribution(1e-6, 1e-3, log=True),
        "kernel.type": optuna.distributions.CategoricalDistribution(["rbf", "polynomial", "imq"]),
        "sampler.timesteps": optuna.distributions.CategoricalDistribution([5, 10, 20]),
    }
    for T, kernel, lr, _bw, _status, fids in TRIALS.values():
        if fids:
            params = {"finetune.lr": lr, "kernel.type": kernel, "sampler.timesteps": T}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=min(fids)))
    return url


def build_sweep(
    root: Path,
    *,
    sweep_id: str = "sweep-fixture",
    optuna: bool = False,
    models: bool = True,
    speed: bool = True,
    evaluation: bool = True,
) -> Path:
    """Write a synthetic results directory under ``root``; returns ``root / "sweep"``."""
    results_dir = root / "sweep"
    results_dir.mkdir(parents=True, exist_ok=True)
    write_results(results_dir, sweep_id)
    base_dir = write_models(root, results_dir) if models else root / "models" / "base"
    if speed:
        write_speed(results_dir, sweep_id)
    if evaluation:
        from mmdsweep.results.evaluation import write_evaluation

        write_evaluation(
            evaluation_rows(base_dir=str(base_dir)), results_dir / "evaluation.parquet", append=False
        )
    meta: dict[str, Any] = {
        "sweep_id": sweep_id,
        "experiment_name": EXPERIMENT,
        "experiment_file": "experiments/digits.yaml",
        "base_model_dir": str(base_dir),
        "exports": {str(T): f"exported/T{T}" for T in EXPORTED} if models else {},
        "sampler": "ddim",
        "spacing": "uniform",
        "optuna_storage": write_optuna(results_dir, sweep_id) if optuna else None,
        "study_name": sweep_id if optuna else None,
        "objectives": ["fid"],
        "baseline": BASELINE,
    }
    (results_dir / "sweep.json").write_text(json.dumps(meta, indent=2))
    (results_dir / "experiment.yaml").write_text(
        "name: digits_mmd\nsampler:\n  name: ddim\n  timesteps: 5\nfinetune:\n  lr: 1.0e-5\n"
    )
    return results_dir


if __name__ == "__main__":  # build one by hand: python tests/sweep_fixture.py /tmp/somewhere
    import sys

    print(build_sweep(Path(sys.argv[1]), optuna="--optuna" in sys.argv))
