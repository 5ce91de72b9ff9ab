"""Sweep objectives: the one map from a ``search.objectives`` name to the reported metric it
optimises and its direction (stdlib only).

The names are those ``mmdsweep.config`` accepts (``tests/test_architecture.py`` checks that the
two agree); the metrics are columns of ``metrics.parquet`` (what ``ray.train.report`` sends).
"""

from __future__ import annotations

from collections.abc import Iterable

OBJECTIVE_METRICS: dict[str, tuple[str, str]] = {
    "fid": ("fid", "min"),
    "kid": ("kid", "min"),
    "timesteps": ("timesteps", "min"),
    "sample_time": ("sample_time_per_image_s", "min"),
}
"""objective name -> (reported metric, ``"min"`` | ``"max"``)."""


def objective_metrics(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """The reported metrics and modes of the objectives ``names``, in order."""
    pairs = [OBJECTIVE_METRICS[n] for n in names]
    return [p[0] for p in pairs], [p[1] for p in pairs]
