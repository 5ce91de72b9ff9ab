"""The final evaluation protocol of a model and its training-free baselines (docs/results.md).

For each fresh noise seed in ``eval.final_seeds`` (k >= 3), ``eval.final_num_samples`` images of the
recorded chain are scored in every evaluation space against the final reference
(``eval.final_reference``: the held-out split by default), then mean +- std (ddof=1) over the seeds.
The baselines are every training-free sampler x spacing of the base model at the same T under the same
protocol, computed once and cached (key: model + protocol + chain). Rows go to a versioned
``evaluation.parquet`` (:func:`mmdsweep.results.evaluation.evaluation_schema`; the schema, reader and the
table logic, torch-free, live in :mod:`mmdsweep.results.evaluation` and are re-exported here). Used by ``python -m mmdsweep.evaluate`` and by the
sweep's finalisation.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mmdsweep.config import ConfigError, Experiment, from_dict, load_experiment
from mmdsweep.results.evaluation import (  # noqa: F401  (re-exported: the table logic lives in the results layer)
    EVALUATION_FILE,
    EVALUATION_SCHEMA_VERSION,
    best_baselines,
    evaluation_schema,
    final_comparison,
    gain_vs_best_baseline,
    read_evaluation,
    summarize,
    write_evaluation,
)

BASELINE_SAMPLERS = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc")
BASELINE_SPACINGS = ("leading", "trailing", "linspace", "quadratic")
BASELINE_CACHE_VERSION = "1"


def rows_from_results(
    results: Iterable[Any], *, kind: str, model: str, protocol: str, trial_id: str | None = None
) -> list[dict[str, Any]]:
    """One row per (result, space) from :class:`~mmdsweep.inference.evaluation.EvalResult` objects."""
    rows = []
    now = time.time()
    for r in results:
        ch = r.chain
        for space, scores in r.per_space.items():
            # the column joins warnings with "; ": a warning's own "; " would split it when read back
            warns = [
                w.removeprefix(f"{space}: ").replace("; ", ", ")
                for w in r.warnings
                if w.startswith(f"{space}: ")
            ]
            rows.append(
                {
                    "kind": kind,
                    "model": model,
                    "trial_id": trial_id,
                    "sampler": r.sampler,
                    "spacing": r.spacing,
                    "timesteps": int(r.timesteps),
                    "eta": float(ch.get("eta", 0.0)),
                    "clip_sample": bool(ch.get("clip_sample", False)),
                    "final_clamp": bool(ch.get("final_clamp", True)),
                    "grid": json.dumps(ch.get("grid")) if ch.get("grid") else None,
                    "space": space,
                    "protocol": protocol,
                    "seed": int(r.seed),
                    "reference": r.reference,
                    "num_samples": int(r.num_samples),
                    "fid": float(scores["fid"]),
                    "kid": float(scores["kid"]),
                    "preprocessing": r.preprocessing.get(space, ""),
                    "warnings": "; ".join(warns),
                    "sec_per_image": float(r.sample_time_per_image_s),
                    "created_unix": now,
                }
            )
    return rows


# --------------------------------------------------------------------------------------------- running


def _protocol_id(exp: Experiment, evaluator: Any) -> dict[str, Any]:
    e = exp.eval
    return {
        "seeds": list(e.final_seeds),
        "num_samples": evaluator.num_samples,
        "reference": evaluator.reference_name,
        "refs": {name: ref.key for name, ref in evaluator.references.items()},
        "kid": [e.kid_subsets, e.kid_subset_size],
        "data_seed": exp.seed,
    }


def _model_id(model_dir: str) -> str:
    """Content id of a model directory: hash of its weight files' names, sizes and mtimes."""
    root = Path(model_dir)
    parts = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json") and p.name != "mmdsweep.json":
            st = p.stat()
            parts.append(f"{p.relative_to(root)}:{st.st_size}:{int(st.st_mtime)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def build_final_evaluator(exp: Experiment, channels: int, device: Any) -> Any:
    from mmdsweep.assets import components as comp
    from mmdsweep.train.loop import build_evaluator

    src = comp.resolve_model_source(exp)
    return build_evaluator(exp, src, channels, device, protocol="final")


_PREPARED: dict[tuple[str, str], Any] = {}


def final_rows_for_model(
    exp: Experiment,
    model_dir: str | Path,
    evaluator: Any,
    *,
    chain: Any = None,
    kind: str = "model",
    trial_id: str | None = None,
    device: Any = None,
    label: str | None = None,
) -> list[dict[str, Any]]:
    """Final-protocol rows (one per seed x space) of a model directory's chain."""
    from mmdsweep.inference.evaluation import final_protocol
    from mmdsweep.inference.generate import prepare_model, read_state, resolve_chain

    key = (str(model_dir), str(device or evaluator.device))
    if key not in _PREPARED:  # load each model once per process (baselines share the base model)
        _PREPARED.clear()
        _PREPARED[key] = prepare_model(str(model_dir), device or evaluator.device)
    den, eps, dev, shape = _PREPARED[key]
    if chain is None:
        chain = resolve_chain(den, None, state=read_state(model_dir))
    with __import__("torch").no_grad():
        results = final_protocol(evaluator, eps, den.schedule, shape, chain, exp.eval.final_seeds)
    return rows_from_results(
        results, kind=kind, model=label or str(model_dir), protocol="final", trial_id=trial_id
    )


def baseline_rows(
    exp: Experiment,
    base_model_dir: str,
    timesteps: Iterable[int],
    evaluator: Any,
    *,
    samplers: Sequence[str] = BASELINE_SAMPLERS,
    spacings: Sequence[str] = BASELINE_SPACINGS,
    cache_dir: Path | None = None,
    show_progress: bool = False,
) -> list[dict[str, Any]]:
    """Every training-free baseline (sampler x spacing) of the base model at each T, final protocol, cached
    per (model content, protocol, chain) under ``<cache>/baselines``."""
    import dataclasses

    from mmdsweep.assets import components as comp
    from mmdsweep.core.sampling import ChainSpec
    from mmdsweep.inference.generate import prepare_model

    cache = cache_dir or comp.cache_root(exp) / "baselines"
    den, _, _, _ = prepare_model(base_model_dir, evaluator.device)
    mid = _model_id(base_model_dir)
    proto = _protocol_id(exp, evaluator)
    base_chain = ChainSpec.resolve(
        sampler="ddim",
        timesteps=1,
        spacing=None,
        eta=0.0,
        clip_sample=exp.sampler.clip_sample,
        clip_sample_range=exp.sampler.clip_sample_range,
        final_clamp=exp.sampler.final_clamp,
        scheduler_config=den.scheduler_config,
    )
    rows: list[dict[str, Any]] = []
    for T in sorted({int(t) for t in timesteps}):
        for sampler in samplers:
            for spacing in spacings:
                chain = dataclasses.replace(base_chain, sampler=sampler, spacing=spacing, timesteps=T)
                try:
                    chain.timestep_grid(den.schedule.num_train_timesteps)
                except ValueError:
                    continue  # e.g. a grid that cannot hold T distinct steps
                path = _rows_cache_file(
                    cache,
                    {"v": BASELINE_CACHE_VERSION, "model": mid, "protocol": proto, "chain": chain.to_dict()},
                )
                if path.is_file():
                    rows += _cached_rows(path)
                    continue
                t0 = time.time()
                new = final_rows_for_model(
                    exp, base_model_dir, evaluator, chain=chain, kind="baseline", label=base_model_dir
                )
                _cache_rows(path, new)
                rows += new
                if show_progress:
                    fid = [r["fid"] for r in new if r["space"] == exp.features.eval]
                    print(
                        f"baseline {sampler}/{spacing} T={T}: FID {sum(fid) / len(fid):.3f} "
                        f"({time.time() - t0:.0f}s)",
                        file=sys.stderr,
                    )
    return rows


REAL_FLOOR_CACHE_VERSION = "1"
REAL_LABEL = "real"


def real_floor_rows(
    exp: Experiment,
    evaluator: Any,
    channels: int,
    *,
    cache_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """The metric's floor under the final protocol: real images of the training data scored as if they were
    samples, one row per final seed x space (``kind="real"``, ``sampler="real"``, ``timesteps=0``).

    For each seed s in ``eval.final_seeds``, ``min(N, len(bank))`` images (N = the evaluator's number of
    samples) are drawn without replacement, seeded by s, from the ``bank`` role (the training split minus the
    validation and carved held-out parts: never the final reference's images, unless ``eval.final_reference``
    is ``train``) and scored against the same reference, in the same spaces, with the same preprocessing as a
    chain's samples. A sampler that drew exactly from the training data would score this on average: FID of
    finite samples is biased upwards (more for small N and high-dimensional features), so a model's final FID
    cannot be expected below it. When the bank has fewer than N images the rows record the smaller
    ``num_samples`` (then not comparable: FID's bias depends on N). Cached per (data, protocol) under
    ``<cache>/baselines``.
    """
    import numpy as np
    import torch

    from mmdsweep.assets import components as comp

    ds, did = comp.role_dataset(exp, "bank", channels)
    path = _rows_cache_file(
        cache_dir or comp.cache_root(exp) / "baselines",
        {"v": REAL_FLOOR_CACHE_VERSION, "data": did, "protocol": _protocol_id(exp, evaluator)},
        prefix="real-",
    )
    if path.is_file():
        return _cached_rows(path)
    n = min(int(evaluator.num_samples), len(ds))
    step = max(1, int(evaluator.batch_size))
    results = []
    for seed in exp.eval.final_seeds:
        idx = sorted(
            int(i) for i in np.random.default_rng([int(seed), 0x2EA1]).choice(len(ds), size=n, replace=False)
        )
        # loaded batch by batch: N real images at full resolution (LSUN 256x256) would not fit in memory at once
        batches = (torch.stack([ds[i][0] for i in idx[a : a + step]]) for a in range(0, n, step))
        results.append(evaluator.evaluate_images(batches, seed=int(seed), label=REAL_LABEL))
    rows = [
        {**r, "eta": None, "clip_sample": None, "final_clamp": None, "sec_per_image": None}  # no chain
        for r in rows_from_results(
            results, kind="real", model=f"{exp.data.dataset}:bank", protocol="final", trial_id=None
        )
    ]
    _cache_rows(path, rows)
    return rows


def _rows_cache_file(cache: Path, payload: dict[str, Any], prefix: str = "") -> Path:
    """``<cache>/<prefix><24 hex of sha256(payload as sorted JSON)>.json``: the cache file of final-protocol
    rows identified by ``payload`` (what changes them: model or data, protocol, chain)."""
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
    return cache / f"{prefix}{key}.json"


def _cached_rows(path: Path) -> list[dict[str, Any]]:
    return list(json.loads(path.read_text()))


def _cache_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    from mmdsweep.utils import atomic_write_text

    atomic_write_text(path, json.dumps(rows))


# --------------------------------------------------------------------------------------------- CLI


def experiment_for(checkpoint: Path, experiment: str | None, overrides: dict[str, Any]) -> Experiment:
    if experiment:
        return load_experiment(experiment, overrides)
    state = checkpoint / "state.json"
    if not state.is_file():
        raise ConfigError(
            f"{checkpoint}: no state.json with the experiment it was trained with; pass --experiment FILE"
        )
    exp = from_dict(json.loads(state.read_text())["experiment"], source=str(state))
    return exp.with_overrides(overrides) if overrides else exp


def format_summary(summary: Any, primary: str) -> str:
    if summary is None or len(summary) == 0:
        return "(no rows)"
    lines = []
    for _, r in summary.sort_values(["space", "timesteps", "fid_mean"]).iterrows():
        std = "" if not math.isfinite(r["fid_std"]) else f" +- {r['fid_std']:.3f}"
        warn = f"  [warnings: {r['warnings']}]" if r["warnings"] else ""
        mark = "*" if r["space"] == primary else " "
        lines.append(
            f"{mark}{r['space']:<26} T={int(r['timesteps']):<4} {r['kind']:<8} {r['sampler']:<9} "
            f"{r['spacing']:<10} FID {r['fid_mean']:.3f}{std}  (k={int(r['k'])}, N={int(r['num_samples'])}, "
            f"ref {r['reference']}){warn}"
        )
    return "\n".join(lines)
