"""Sampling speed of a model at several timestep budgets, stored as ``speed.parquet``.

``measure_sampling_speed`` times the few-step sampler of one model (wall time per image,
device synchronised, after warm-up batches); ``write_speed_table`` stores the rows in a
sweep's results directory, where the analysis joins them on ``timesteps`` to put FID against
real sampling cost (``mmdsweep.analysis.pareto_front(..., x="seconds_per_image")``).

``speed.parquet`` has one row per ``(model, sampler, spacing, timesteps, device, dtype)``;
writing a row with the same key again replaces the old one. See ``SPEED_SCHEMA`` and
``docs/results.md`` ("Analysing results").

Command line (measures the base model and every export listed in ``sweep.json``)::

    python -m mmdsweep.speed RESULTS_DIR [--timesteps 5 10 20 50] [--device auto]
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmdsweep.core.dtypes import DTYPES
from mmdsweep.core.sampling import SAMPLERS, ChainSpec
from mmdsweep.inference.generate import fail, generate, plain_chain, prepare_model
from mmdsweep.results.layout import SweepLayout, export_name
from mmdsweep.results.reader import model_dirs, read_sweep_meta
from mmdsweep.results.speed import (  # noqa: F401  (the table's names stay importable from here)
    SPEED_FILE,
    SPEED_KEY,
    SPEED_SCHEMA,
    read_speed_table,
    speed_metadata,
    write_speed_table,
)
from mmdsweep.results.speed import (
    speed_frame as _frame,
)

if TYPE_CHECKING:
    import pandas as pd

    from mmdsweep.assets.models import Denoiser

DEFAULT_TIMESTEPS: tuple[int, ...] = (5, 10, 20, 50)


def device_name(device: torch.device) -> str:
    """Human-readable name of ``device`` (GPU model, or the CPU's processor string)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_sampling_speed(
    model_dir: str | os.PathLike[str] | Denoiser,
    timesteps: Iterable[int] = DEFAULT_TIMESTEPS,
    *,
    sampler: str = "ddim",
    spacing: str = "uniform",
    eta: float = 0.0,
    batch_size: int = 64,
    num_images: int = 256,
    device: str | torch.device = "auto",
    warmup: int = 1,
    dtype: str = "float32",
    model: str | None = None,
) -> pd.DataFrame:
    """Wall time per image of ``sampler`` at each number of timesteps T.

    For every T the model first samples ``warmup`` untimed batches, then ``num_images`` images
    in batches of ``batch_size`` (the last one may be smaller) from a synchronised start to a
    synchronised end; ``seconds_per_image`` is that wall time divided by ``num_images``. Noise
    generation is not timed. ``model`` labels the rows (default: the directory's name; pass
    ``model="base"`` or ``"T5"``, ... for a sweep's ``speed.parquet``, see :func:`speed_per_t`
    in ``mmdsweep.analysis``). A :class:`~mmdsweep.assets.models.Denoiser` passed in is moved to
    ``device`` and ``dtype`` in place.

    Returns one row per T with the columns of :data:`SPEED_SCHEMA`.
    """
    import pandas as pd

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}: expected one of {sorted(SAMPLERS)}")
    if batch_size < 1 or num_images < 1 or warmup < 0:
        raise ValueError(
            f"batch_size={batch_size}, num_images={num_images} must be >= 1, warmup={warmup} >= 0"
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    ts_list = [int(t) for t in timesteps]
    if not ts_list:
        raise ValueError("timesteps: expected at least one value")
    torch_dtype = DTYPES[dtype]
    den, eps, dev, shape = prepare_model(model_dir, device, torch_dtype)
    sizes = [min(batch_size, num_images - s) for s in range(0, num_images, batch_size)]
    label = (
        model
        if model is not None
        else (Path(str(model_dir)).name if not _is_denoiser(model_dir) else "model")
    )
    rows: list[dict[str, Any]] = []
    for T in ts_list:
        chain = plain_chain(sampler, T, spacing, eta, den.scheduler_config)

        def run(n: int, chain: ChainSpec = chain) -> float:
            # the one generation loop; it times the chain only (noise generation is not timed)
            _, per_image = generate(
                eps,
                den.schedule,
                chain,
                num=n,
                shape=shape,
                seed=0,
                batch_size=n,
                device=dev,
                dtype=torch_dtype,
            )
            return per_image * n

        for _ in range(warmup):
            run(batch_size)
        _synchronize(dev)
        elapsed = sum(run(n) for n in sizes)
        rows.append(
            {
                "model": label,
                "model_dir": None if _is_denoiser(model_dir) else str(model_dir),
                "sampler": sampler,
                "spacing": spacing,
                "eta": float(eta),
                "timesteps": T,
                "device": str(dev),
                "device_name": device_name(dev),
                "dtype": dtype,
                "batch_size": batch_size,
                "num_images": num_images,
                "warmup": warmup,
                "seconds_per_image": elapsed / num_images,
                "measured_at": dt.datetime.now(dt.timezone.utc),
            }
        )
    return _frame(pd.DataFrame(rows))


def _is_denoiser(obj: Any) -> bool:
    from mmdsweep.assets.models import Denoiser

    return isinstance(obj, Denoiser)


def measure_sweep_speed(
    results_dir: str | os.PathLike[str],
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    *,
    batch_size: int = 64,
    num_images: int = 256,
    device: str = "auto",
    warmup: int = 1,
    dtype: str = "float32",
) -> pd.DataFrame:
    """Speed rows for a sweep: the base model (``"base"``) at every T of ``timesteps`` and at each
    exported T, and every export ``"T{T}"`` of ``sweep.json`` at its own T, with the sweep's
    sampler and spacing."""
    import pandas as pd

    meta = read_sweep_meta(results_dir)
    sampler = str(meta.get("sampler") or "ddim")
    spacing = str(meta.get("spacing") or "uniform")
    dirs = model_dirs(results_dir, meta)
    exported = sorted(int(name[1:]) for name in dirs if name != "base")
    frames = []

    def measure(model_dir: str, ts: Iterable[int], label: str) -> pd.DataFrame:
        return measure_sampling_speed(
            model_dir,
            ts,
            sampler=sampler,
            spacing=spacing,
            batch_size=batch_size,
            num_images=num_images,
            device=device,
            warmup=warmup,
            dtype=dtype,
            model=label,
        )

    if "base" in dirs:
        frames.append(measure(dirs["base"], sorted(set(timesteps) | set(exported)), "base"))
    for T in exported:
        frames.append(measure(dirs[export_name(T)], [T], export_name(T)))
    if not frames:
        raise FileNotFoundError(f"{results_dir}: sweep.json names no base model and no exports")
    return pd.concat(frames, ignore_index=True)


def main(argv: Sequence[str] | None = None) -> int:
    from mmdsweep.cli_args import speed_parser

    parser = speed_parser()
    args = parser.parse_args(argv)
    if not SweepLayout(args.results_dir).sweep_json.is_file():
        return fail(f"{args.results_dir}/sweep.json not found: not a sweep results directory")
    t0 = time.perf_counter()
    df = measure_sweep_speed(
        args.results_dir,
        args.timesteps,
        batch_size=args.batch_size,
        num_images=args.num_images,
        device=args.device,
        warmup=args.warmup,
        dtype=args.dtype,
    )
    path = write_speed_table(args.results_dir, df, sweep_id=read_sweep_meta(args.results_dir).get("sweep_id"))
    for row in df.itertuples():
        ms = 1000 * float(row.seconds_per_image)  # type: ignore[arg-type]
        print(f"{row.model:>6} {row.sampler} T={row.timesteps:<3} {ms:8.3f} ms/image on {row.device}")
    print(f"wrote {path} ({len(df)} rows) in {time.perf_counter() - t0:.1f}s")
    return 0 if all(math.isfinite(float(v)) for v in df["seconds_per_image"]) else 1


if __name__ == "__main__":
    sys.exit(main())
