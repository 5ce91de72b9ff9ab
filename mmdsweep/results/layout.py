"""The layout of a sweep's results directory, defined once (pyarrow/stdlib only: no torch, no Ray).

::

    <output.dir>/<output.name>/            SweepLayout(root)
        sweep.json                          .sweep_json   (layout_version, sweep_id, exports, ...)
        experiment.yaml                     .experiment   (the resolved experiment)
        trials.parquet                      .trials       (one row per trial)
        metrics.parquet                     .metrics      (one row per report)
        evaluation.parquet                  .evaluation   (final-protocol scores)
        speed.parquet                       .speed        (sampling speed per model and T)
        checkpoints/T<T>/                   .checkpoint(T) (best checkpoint fetched per T)
        exported/T<T>/                      .exported(T)  (diffusers pipeline per T)

Writers and readers take file names from :class:`SweepLayout`, never from string literals.
``sweep.json`` carries ``layout_version`` (:data:`LAYOUT_VERSION`; a file without it is 1, the
flat package before the layered one), so that ``--resume`` can refuse a directory whose Tune
state names modules that no longer exist.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "EXPERIMENT_FILE",
    "LAYOUT_VERSION",
    "SWEEP_FILE",
    "SweepLayout",
    "layout_version",
    "model_dirs",
    "read_sweep_json",
    "read_sweep_meta",
]

LAYOUT_VERSION = 2
"""1: the flat package (``mmdsweep.tune.worker_loop``, ``mmdsweep.results.ParquetResultsCallback``
pickled in Tune's state); 2: the layered package."""

SWEEP_FILE = "sweep.json"
EXPERIMENT_FILE = "experiment.yaml"
TRIALS_FILE = "trials.parquet"
METRICS_FILE = "metrics.parquet"
EVALUATION_FILE = "evaluation.parquet"
SPEED_FILE = "speed.parquet"
CHECKPOINTS_DIR = "checkpoints"
EXPORTED_DIR = "exported"


@dataclass(frozen=True)
class SweepLayout:
    """Paths inside one sweep's results directory."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def sweep_json(self) -> Path:
        return self.root / SWEEP_FILE

    @property
    def experiment(self) -> Path:
        return self.root / EXPERIMENT_FILE

    @property
    def trials(self) -> Path:
        return self.root / TRIALS_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def evaluation(self) -> Path:
        return self.root / EVALUATION_FILE

    @property
    def speed(self) -> Path:
        return self.root / SPEED_FILE

    def checkpoint(self, timesteps: int) -> Path:
        return self.root / CHECKPOINTS_DIR / export_name(timesteps)

    def exported(self, timesteps: int) -> Path:
        return self.root / EXPORTED_DIR / export_name(timesteps)


def export_name(timesteps: int) -> str:
    """``T<T>``: the name of a per-T model (export directory, ``model`` label in speed.parquet)."""
    return f"T{int(timesteps)}"


def layout_version(meta: dict[str, Any]) -> int:
    """The layout version recorded in a ``sweep.json`` mapping (missing = 1, the flat layout)."""
    try:
        return int(meta.get("layout_version") or 1)
    except (TypeError, ValueError):
        return 1


def read_sweep_json(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The raw ``sweep.json`` of ``root`` (None if there is none)."""
    path = SweepLayout(root).sweep_json
    if not path.is_file():
        return None
    loaded = json.loads(path.read_text())
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return loaded


def _parquet_meta(path: Path) -> dict[bytes, bytes]:
    import pyarrow.parquet as pq

    return dict(pq.read_schema(path).metadata or {})


def read_sweep_meta(results_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``sweep.json`` of a results directory, completed with defaults and the Parquet metadata.

    Always has the keys ``sweep_id``, ``experiment_name``, ``base_model_dir``, ``exports``
    (``{"5": path, ...}``), ``sampler``, ``spacing``, ``optuna_storage``, ``study_name`` and
    ``objectives``; those the file lacks are ``None`` (``{}`` for ``exports``).
    """
    from mmdsweep.results import META_EXPERIMENT_NAME, META_SWEEP_ID

    base = Path(results_dir)
    meta: dict[str, Any] = dict(read_sweep_json(base) or {})
    trials_path = SweepLayout(base).trials
    pmeta = _parquet_meta(trials_path) if trials_path.exists() else {}
    if not meta.get("sweep_id"):
        raw = pmeta.get(META_SWEEP_ID)
        meta["sweep_id"] = raw.decode() if raw else base.name
    if not meta.get("experiment_name"):
        raw = pmeta.get(META_EXPERIMENT_NAME)
        meta["experiment_name"] = raw.decode() if raw else None
    defaults: dict[str, Any] = {
        "experiment_file": None,
        "base_model_dir": None,
        "exports": {},
        "sampler": "ddim",
        "spacing": "uniform",
        "optuna_storage": None,
        "study_name": None,
        "objectives": ["fid"],
    }
    for key, value in defaults.items():
        if meta.get(key) is None:
            meta[key] = value
    meta["exports"] = {str(k): v for k, v in dict(meta["exports"]).items()}
    return meta


def _resolve(results_dir: Path, path: str, must_exist: bool) -> str:
    """A path of ``sweep.json``: absolute, relative to the results directory, or (base model
    only) relative to the working directory or a Hugging Face repo id."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute():
        return str(p)
    inside = results_dir / p
    if inside.exists() or must_exist:
        return str(inside)
    return path


def model_dirs(results_dir: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> dict[str, str]:
    """Model locations named in ``sweep.json``: ``{"base": ..., "T5": ..., "T10": ...}``.

    Exports are sorted by T; relative export paths are taken relative to ``results_dir``.
    """
    base = Path(results_dir)
    meta = meta if meta is not None else read_sweep_meta(base)
    out: dict[str, str] = {}
    if meta.get("base_model_dir"):
        out["base"] = _resolve(base, str(meta["base_model_dir"]), must_exist=False)
    for key in sorted(meta.get("exports") or {}, key=lambda k: int(k)):
        out[export_name(int(key))] = _resolve(base, str(meta["exports"][key]), must_exist=True)
    return out
