"""Does learning the timestep grid lower the objective it follows? (issue 9, diagnosis of the learned grid).

For each grid (the chain's initial spacing and every learned grid in the ``kind == "model"`` rows of the
given ``benchmarks/quality_vs_time.py`` Parquet files), this measures the MMD-DDM training objective with a
large batch instead of a minibatch: the unbiased MMD^2 (the experiment's kernel, :func:`mmdsweep.core.mmd.mmd2_unbiased`)
between the training-space features of N samples of the T-step chain on that grid and **the whole real bank**
(the features the loss draws its real minibatches from), averaged over k initial-noise seeds. Where it goes up
while the loop trains, the optimiser is walking on minibatch noise, not descending the objective; where it
goes down while the held-out FID goes up, the objective itself disagrees with the metric.

The held-out FID of the same grids (the final protocol, on the same Parquet rows) is printed beside it.

    python benchmarks/grid_objective.py experiments/digits.yaml --parquet benchmarks/results/qvt_a.parquet [...]
        [--set features.train=classifier --set features.train_resize=null] [--num-samples 1000] [--seeds 1001 1002 1003]

The ``--set`` overrides must name the training space the runs used (the objective is measured in it).
Writes ``benchmarks/results/grid_objective.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from mmdsweep.config import add_set_argument, load_experiment, parse_override
from mmdsweep.core.mmd import mmd2_unbiased
from mmdsweep.core.noise import initial_noise
from mmdsweep.core.sampling import sample
from mmdsweep.train.loop import build_setup, chain_of, kernel_spec
from mmdsweep.utils import set_threads


@torch.no_grad()
def objective(setup, grid: list[int], sampler: str, n: int, seed: int, batch: int = 250) -> float:  # type: ignore[no-untyped-def]
    """Unbiased MMD^2 between the training features of ``n`` samples on ``grid`` and the whole bank."""
    den = setup.denoiser
    shape = (den.channels, den.resolution, den.resolution)
    feats = []
    for start in range(0, n, batch):
        count = min(batch, n - start)
        x_t = initial_noise(shape, seed=seed, role="eval", start=start, count=count)
        x = sample(den.eps_fn(), x_t.to(setup.device), den.schedule, grid, sampler=sampler).clamp(-1, 1)
        feats.append(setup.train_space(x).double().cpu())
    bank = setup.bank.features.double()
    value, _ = mmd2_unbiased(torch.cat(feats), bank, kernel_spec(setup.exp))
    return float(value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment")
    ap.add_argument("--parquet", nargs="+", required=True, help="benchmarks/quality_vs_time.py output(s)")
    add_set_argument(ap)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1001, 1002, 1003])
    ap.add_argument("--out", default="benchmarks/results/grid_objective.md")
    args = ap.parse_args(argv)
    exp = load_experiment(args.experiment, dict(parse_override(s) for s in args.set))
    set_threads(exp.finetune.threads)
    t0 = time.time()
    setup = build_setup(exp, torch.device("cpu"), evaluate=False)
    n_train = setup.denoiser.schedule.num_train_timesteps
    start_grid = [int(t) for t in chain_of(exp, setup.denoiser).timestep_grid(n_train)]

    rows: list[tuple[str, str, list[int], float, float]] = []
    for path in args.parquet:
        df = pd.read_parquet(path)
        models = df[df["kind"] == "model"]
        primary = models[models["space"] == exp.features.eval]
        for model, g in primary.groupby("model", sort=False):
            grid = [int(t) for t in json.loads(g["grid"].iloc[0])]
            fids = g["fid"].tolist()
            rows.append((Path(path).stem, str(model), grid, statistics.mean(fids), statistics.stdev(fids)))
    table = [("start", "(start)", start_grid, math.nan, math.nan), *rows]
    lines = [
        f"# The learned grid's objective, measured with the whole bank ({exp.sampler.name}, T={exp.sampler.timesteps})",
        "",
        f"`python {' '.join(sys.argv)}` ({platform.machine()}, {torch.get_num_threads()} torch thread(s)).",
        "",
        f"Objective: unbiased MMD^2 x 1e3 ({exp.kernel.type} kernel) between the `{exp.features.train}` features of "
        f"N = {args.num_samples} samples and all {len(setup.bank)} bank images (the loss's real features), mean +- std "
        f"over the eval role's initial-noise seeds {args.seeds}. Held-out "
        f"FID: the final protocol's value from the Parquet rows ({exp.features.eval}, mean +- std over its seeds).",
        "",
        "| run | checkpoint | grid | objective (x 1e3) | held-out FID |",
        "|---|---|---|---:|---:|",
    ]
    cache: dict[tuple[int, ...], tuple[float, float]] = {}
    for run, model, grid, fid_m, fid_s in table:
        key = tuple(grid)
        if key not in cache:
            vals = [1e3 * objective(setup, grid, exp.sampler.name, args.num_samples, s) for s in args.seeds]
            cache[key] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else math.nan)
        m, s = cache[key]
        fid = "" if math.isnan(fid_m) else f"{fid_m:.3f} +- {fid_s:.3f}"
        line = f"| {run} | {model} | {grid} | {m:.2f} +- {s:.2f} | {fid} |"
        print(line, flush=True)
        lines.append(line)
    lines += ["", f"Total {time.time() - t0:.0f} s."]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
