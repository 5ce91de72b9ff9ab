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
        checkpoints/T<T>-<mode>/            .candidate_checkpoint(T, mode) (best of one finetune.train
                                            mode at T, final-scored beside the exported one)
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
    "read_sweep_json",
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

    def candidate_checkpoint(self, timesteps: int, mode: str) -> Path:
        """Where the best checkpoint of one ``finetune.train`` mode at T is fetched (a remote one is
        copied there) for the final evaluation, apart from the exported model's :meth:`checkpoint`."""
        return self.root / CHECKPOINTS_DIR / f"{export_name(timesteps)}-{mode}"

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
