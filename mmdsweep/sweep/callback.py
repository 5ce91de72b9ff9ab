"""The Ray Tune callback that records a sweep's trials and reports as Parquet.

A thin adapter: every Tune hook becomes one call of :class:`mmdsweep.results.ResultsWriter`,
which appends part files (a flush per ``flush_every`` events or ``flush_seconds``, at each
trial's end, at the sweep's end, at exit and on SIGTERM) and compacts them when the sweep ends.
See :mod:`mmdsweep.results.writer` for the guarantees (constant cost per event, a write-ahead
log against a killed driver, deduplication on resume).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from mmdsweep.results import ResultsWriter

if TYPE_CHECKING:
    from ray.train import Checkpoint
    from ray.tune.experiment import Trial


FLUSH_SECONDS_ENV = "MMDSWEEP_RESULTS_FLUSH_SECONDS"
"""Environment variable: default ``flush_seconds`` of the callback (10 when unset)."""


class ParquetResultsCallback(Callback):
    """Tune callback keeping the sweep's ``trials``/``metrics`` Parquet tables current.

    Args:
        out_dir: local directory of the sweep's results (created if missing).
        sweep_id: identifier stored in every row and in the file metadata.
        param_types: searched parameters, ``{dotted name: "float"|"int"|"str"}``.
        experiment_name: Tune experiment name, stored in the file metadata.
        flush_every, flush_seconds: batching of the part files (see ``ResultsWriter``);
            ``flush_seconds`` defaults to ``$MMDSWEEP_RESULTS_FLUSH_SECONDS`` or 10.

    Tune pickles callbacks into ``tuner.pkl``; ``Tuner.restore`` unpickles them without calling
    ``__init__``. Only the configuration is pickled; unpickling reopens the directory, which
    recovers any events a killed driver had logged and continues the sequence numbers.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        sweep_id: str,
        param_types: Mapping[str, str],
        experiment_name: str,
        *,
        flush_every: int = 1000,
        flush_seconds: float | None = None,
    ) -> None:
        if flush_seconds is None:  # an operator's knob: fresher parts for a live dashboard
            flush_seconds = float(os.environ.get(FLUSH_SECONDS_ENV, "10"))
        self._open(
            {
                "out_dir": out_dir,
                "sweep_id": sweep_id,
                "param_types": param_types,
                "experiment_name": experiment_name,
                "flush_every": flush_every,
                "flush_seconds": flush_seconds,
            }
        )

    def _open(self, config: Mapping[str, Any]) -> None:
        """Keep ``config`` (normalised; the flush settings default as in schema-1 pickles) and open the writer."""
        c: dict[str, Any] = {
            "out_dir": str(config["out_dir"]),
            "sweep_id": config["sweep_id"],
            "param_types": dict(config["param_types"]),
            "experiment_name": config["experiment_name"],
            "flush_every": config.get("flush_every", 1000),
            "flush_seconds": config.get("flush_seconds", 10.0),
        }
        self._config = c
        self.writer = ResultsWriter(
            c["out_dir"],
            c["sweep_id"],
            c["param_types"],
            c["experiment_name"],
            flush_every=c["flush_every"],
            flush_seconds=c["flush_seconds"],
        )

    # ---- pickling (Tuner stores callbacks in tuner.pkl) --------------------

    def __getstate__(self) -> dict[str, Any]:
        """Pickle only the configuration; the data lives in the files."""
        return dict(self._config)

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        """Restore the configuration and reopen the results directory (schema-1 pickles too)."""
        self._open(state)

    @property
    def out_dir(self) -> Path:
        return self.writer.out_dir

    @property
    def sweep_id(self) -> str:
        return self.writer.sweep_id

    def flush(self) -> None:
        """Write the buffered events now."""
        self.writer.flush()

    # ---- Tune hooks --------------------------------------------------------

    def setup(
        self, stop: Any = None, num_samples: Any = None, total_num_samples: Any = None, **info: Any
    ) -> None:
        """Before the first trial: flush on SIGTERM and at exit from now on."""
        self.writer.install_shutdown_hooks()

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        """Tune's loop turned: flush if the oldest buffered event is ``flush_seconds`` old."""
        self.writer.tick()

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.writer.trial_started(trial.trial_id, trial.config)

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ) -> None:
        self.writer.trial_result(trial.trial_id, trial.config, result)

    def on_checkpoint(
        self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: Checkpoint, **info: Any
    ) -> None:
        self.writer.checkpoint(trial.trial_id, checkpoint_uri(checkpoint))

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.writer.trial_recovering(trial.trial_id, trial_error_message(trial))

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.writer.trial_errored(trial.trial_id, trial_error_message(trial))

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.writer.trial_completed(trial.trial_id, checkpoint_uri(getattr(trial, "checkpoint", None)))

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        """Flush, then compact the parts into ``trials.parquet`` and ``metrics.parquet``."""
        self.writer.close()


# --------------------------------------------------------------------------- helpers


def checkpoint_uri(checkpoint: Checkpoint | None) -> str | None:
    """Location of a Tune checkpoint: a local path or a ``scheme://`` URI."""
    if checkpoint is None:
        return None
    path = str(checkpoint.path)
    fs_type = getattr(getattr(checkpoint, "filesystem", None), "type_name", "local")
    if fs_type in ("local", "") or "://" in path:
        return path
    return f"{fs_type}://{path}"


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return text.strip()


def _root_cause(exc: BaseException) -> tuple[BaseException, int | None]:
    """The user's exception behind Ray's wrappers, and the Train worker rank that raised it.

    Ray Train (v2) reports a failed worker group as ``WorkerGroupError`` whose
    ``worker_failures`` maps world rank -> exception (a user exception, or a health-check
    failure carrying e.g. ``ActorDiedError`` for a killed worker); a failed controller as
    ``ControllerError.controller_failure``; Ray tasks as ``RayTaskError.cause``. The lowest
    failing rank is followed.
    """
    rank: int | None = None
    for _ in range(8):  # wrappers nest a few levels at most
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, Mapping) and failures:
            rank = min(failures)
            exc = failures[rank]
            continue
        inner = next(
            (
                getattr(exc, name)
                for name in ("controller_failure", "health_check_failure", "_base_exc", "cause")
                if isinstance(getattr(exc, name, None), BaseException)
            ),
            None,
        )
        if inner is None:
            break
        exc = inner
    return exc, rank


def _format_exception(exc: BaseException) -> str:
    """``"Type: first line"`` of the user's exception behind Ray's wrappers.

    A Train worker's failure gets ``" (worker rank R)"``; a killed worker (``ActorDiedError``)
    also gets Ray's ``Worker exit detail`` line, which says e.g. that the memory monitor killed
    it, since the first line only says that the actor died.
    """
    root, rank = _root_cause(exc)
    text = str(root)
    message = _first_line(text)
    detail = next((line.strip() for line in text.splitlines() if "exit detail" in line.lower()), "")
    if detail and detail != message:
        message = f"{message} {detail}"
    out = f"{type(root).__name__}: {message}" if message else type(root).__name__
    return out if rank is None else f"{out} (worker rank {rank})"


def trial_error_message(trial: Trial) -> str:
    """First line of the error that made ``trial`` fail, as ``"Type: message"``.

    Tune's error hooks get no exception object; Tune has just written the error (pickled, and
    as text) into the trial's driver-side directory, so it is read from there, then from the
    trial's storage as a fallback.
    """
    exc = _pickled_trial_error(trial)
    if exc is not None:
        return _format_exception(exc)
    text = _text_trial_error(trial)
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Failure #")]
    return lines[-1] if lines else "unknown error"


def _pickled_trial_error(trial: Trial) -> BaseException | None:
    import ray.cloudpickle as cloudpickle

    with contextlib.suppress(Exception):
        local = trial.pickled_error_file
        if local and os.path.exists(local):
            with open(local, "rb") as fh:
                return cloudpickle.load(fh)
    with contextlib.suppress(Exception):
        return trial.get_pickled_error()
    return None


def _text_trial_error(trial: Trial) -> str | None:
    with contextlib.suppress(Exception):
        local = trial.error_file
        if local and os.path.exists(local):
            return Path(local).read_text()
    with contextlib.suppress(Exception):
        return trial.get_error()  # type: ignore[return-value]
    return None
