"""How a per-worker training loop reports metrics and finds its checkpoints, without Ray.

:class:`Reporter` is the interface the loop uses; :class:`LocalReporter` implements it for
in-process runs (and torchrun). The Ray Train implementation lives in
:mod:`mmdsweep.sweep.raytrain` (the only package that imports Ray).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from mmdsweep.train import distributed


@runtime_checkable
class Reporter(Protocol):
    """What a per-worker training loop uses to report and resume; see module docstring."""

    rank: int
    world_size: int
    device: torch.device

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: str | Path | None = None) -> None:
        """Report metrics (identical on all ranks) and optionally a checkpoint directory."""
        ...

    def latest_checkpoint_dir(self) -> contextlib.AbstractContextManager[Path | None]:
        """Context manager yielding the latest checkpoint directory, or None."""
        ...


class LocalReporter:
    """Reporter for in-process runs (no Ray), with the same interface.

    Rank 0 appends metrics to ``run_dir/metrics.jsonl`` and copies checkpoints to
    ``run_dir/checkpoints/checkpoint_NNNNNN`` (keeping the last ``num_to_keep``);
    ``run_dir/checkpoints/latest`` names the newest complete one, so a run killed
    mid-copy resumes from the previous checkpoint. Rank/world size come from
    ``torch.distributed`` when it is initialised (e.g. under torchrun).
    """

    def __init__(
        self,
        run_dir: str | Path,
        device: str | torch.device | None = None,
        num_to_keep: int = 2,
        keep_best: str | None = "fid",
    ) -> None:
        self.keep_best = keep_best
        self.run_dir = Path(run_dir)
        self.rank = distributed.get_rank()
        self.world_size = distributed.get_world_size()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.num_to_keep = max(1, num_to_keep)
        self._ckpt_root = self.run_dir / "checkpoints"
        if self.rank == 0:
            self._ckpt_root.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        """The jsonl file holding one line per report."""
        return self.run_dir / "metrics.jsonl"

    def _latest_name(self) -> str | None:
        pointer = self._ckpt_root / "latest"
        return pointer.read_text().strip() if pointer.exists() else None

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: str | Path | None = None) -> None:
        """Append metrics and copy the checkpoint (rank 0 only; a barrier on all ranks).

        With ``keep_best`` (a metric to minimise), the checkpoint with the lowest value so far is
        also kept as ``run_dir/best``.
        """
        if self.rank == 0:
            record = dict(metrics)
            if checkpoint_dir is not None:
                saved = self._save_checkpoint(Path(checkpoint_dir))
                record["checkpoint_path"] = str(saved)
                self._update_best(record, saved)
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record, default=_json_default) + "\n")
        if distributed.is_initialized():
            torch.distributed.barrier()

    def _save_checkpoint(self, src: Path) -> Path:
        latest = self._latest_name()
        index = int(latest.rsplit("_", 1)[1]) + 1 if latest else 0
        name = f"checkpoint_{index:06d}"
        tmp = self._ckpt_root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        tmp.rename(self._ckpt_root / name)
        pointer_tmp = self._ckpt_root / ".latest.tmp"
        pointer_tmp.write_text(name)
        pointer_tmp.replace(self._ckpt_root / "latest")
        self._prune()
        return self._ckpt_root / name

    def best_value(self) -> float:
        """The lowest ``keep_best`` metric among the reports with a checkpoint so far."""
        best = math.inf
        if self.keep_best and self.metrics_path.is_file():
            for line in self.metrics_path.read_text().splitlines():
                rec = json.loads(line) if line.strip() else {}
                value = rec.get(self.keep_best)
                if rec.get("checkpoint_path") and isinstance(value, (int, float)) and value < best:
                    best = float(value)
        return best

    def _update_best(self, record: Mapping[str, Any], saved: Path) -> None:
        value = record.get(self.keep_best) if self.keep_best else None
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value >= self.best_value():
            return
        tmp = self.run_dir / ".best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(saved, tmp)
        old = self.run_dir / ".best.old"
        shutil.rmtree(old, ignore_errors=True)
        if (self.run_dir / "best").exists():
            (self.run_dir / "best").rename(old)
        tmp.rename(self.run_dir / "best")
        shutil.rmtree(old, ignore_errors=True)

    def _prune(self) -> None:
        kept = sorted(p for p in self._ckpt_root.glob("checkpoint_*") if p.is_dir())
        for old in kept[: -self.num_to_keep]:
            shutil.rmtree(old, ignore_errors=True)

    @contextlib.contextmanager
    def latest_checkpoint_dir(self) -> Iterator[Path | None]:
        """Yield the newest complete checkpoint directory under ``run_dir`` (or None)."""
        name = self._latest_name()
        yield (self._ckpt_root / name) if name else None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
