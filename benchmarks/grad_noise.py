"""Gradient noise of the MMD-DDM objective against generated batch, real batch and feature space (issue 9, part 4).

For each setting, K independent minibatches (fresh initial noise AND a fresh real batch from the bank; the
loop's own seeding by step index) each give one gradient of the unbiased MMD^2 through the whole T-step chain,
with respect to (a) the UNet weights and (b) the learned-grid logits (grid at its initial spacing, so (b) is
the gradient that ``finetune.train: timesteps`` follows). The table reports the mean (and std) over the
K(K-1)/2 pairs of the cosine similarity between two such gradients: 1 = every minibatch points the same way,
0 = pure noise. Under the usual model g_k = G + noise_k with noise variance s^2/B,
cos ~ |G|^2 / (|G|^2 + s^2/B): doubling a batch helps only while its noise term dominates.

    OMP_NUM_THREADS=1 python benchmarks/grad_noise.py experiments/digits.yaml            # ~5-10 min, 2 cores
    python benchmarks/grad_noise.py experiments/digits.yaml --gen 8 16 --real 32 --repeats 3   # quicker

The pretrained model must be cached (``python -m mmdsweep.pretrain experiments/digits.yaml``). Writes
``benchmarks/results/grad_noise.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mmdsweep.config import add_set_argument, load_experiment, parse_override
from mmdsweep.core.timegrid import TimeGrid, legacy_spacing
from mmdsweep.train.loop import Setup, build_setup, kernel_spec, mmd_loss
from mmdsweep.utils import set_threads


def _flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in params]
    )


def gradients(
    setup: Setup, grid: TimeGrid, b: int, m: int, k: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """K gradients (weights, grid) of the loss at batch ``b`` (generated) and ``m`` (real); seconds per gradient."""
    exp = setup.exp.with_overrides({"finetune.batch_size": b})
    s = dataclasses.replace(setup, exp=exp)
    unet = s.denoiser.unet
    weights = [p for p in unet.parameters() if p.requires_grad]
    spec = kernel_spec(exp)
    gw: list[torch.Tensor] = []
    gg: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for i in range(k):
        unet.zero_grad(set_to_none=True)
        grid.zero_grad(set_to_none=True)
        # step index 10_000 + i: noise and real batch independent of each other setting's draws
        loss, _ = mmd_loss(s, unet, 10_000 + i, grid, spec, m)
        loss.backward()
        gw.append(_flat_grad(weights))
        gg.append(_flat_grad(list(grid.parameters())))
    return gw, gg, (time.perf_counter() - t0) / k


def pair_cosines(gs: list[torch.Tensor]) -> tuple[float, float]:
    cos = [
        float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(gs, 2)
    ]
    return statistics.fmean(cos), (statistics.stdev(cos) if len(cos) > 1 else math.nan)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment")
    add_set_argument(ap)
    ap.add_argument("--spaces", nargs="+", default=["torchvision:mobilenet_v2", "classifier"])
    ap.add_argument("--gen", nargs="+", type=int, default=[8, 16, 32, 64], help="generated batch sizes")
    ap.add_argument("--real", nargs="+", type=int, default=[32, 128, 512], help="real batch sizes")
    ap.add_argument("--gen-fixed", type=int, default=32, help="generated batch while the real batch varies")
    ap.add_argument("--real-fixed", type=int, default=128, help="real batch while the generated batch varies")
    ap.add_argument(
        "--repeats", type=int, default=4, help="K independent minibatches per setting (K(K-1)/2 pairs)"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/grad_noise.md")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    base = load_experiment(args.experiment, dict(parse_override(s) for s in args.set))
    device = torch.device("cpu")
    T = base.sampler.timesteps
    spacing = legacy_spacing(base.sampler.timestep_spacing, base.sampler.spacing, base.sampler.name)
    settings = sorted({(b, args.real_fixed) for b in args.gen} | {(args.gen_fixed, m) for m in args.real})
    rows: list[dict[str, object]] = []
    t_all = time.perf_counter()
    for space in args.spaces:
        exp = base.with_overrides({"features.train": space})
        setup = build_setup(exp, device, evaluate=False, allow_pretrain=False)
        setup.denoiser.unet.train()
        grid = TimeGrid.from_spacing(T, setup.denoiser.schedule.num_train_timesteps, spacing)
        for b, m in settings:
            m_eff = min(m, len(setup.bank))
            gw, gg, sec = gradients(setup, grid, b, m_eff, args.repeats)
            cw, cw_sd = pair_cosines(gw)
            cg, cg_sd = pair_cosines(gg)
            row = {
                "space": space,
                "gen": b,
                "real": m_eff,
                "cos_w": cw,
                "cos_w_sd": cw_sd,
                "cos_t": cg,
                "cos_t_sd": cg_sd,
                "sec": sec,
            }
            rows.append(row)
            print(
                f"{space:26s} gen {b:3d} real {m_eff:4d}  cos(weights) {cw:+.3f} +- {cw_sd:.3f}  "
                f"cos(grid) {cg:+.3f} +- {cg_sd:.3f}  {sec:.2f} s/grad",
                flush=True,
            )
    total = time.perf_counter() - t_all
    lines = [
        "# Gradient noise of the MMD-DDM objective",
        "",
        f"`python benchmarks/grad_noise.py {args.experiment}"
        + "".join(f" --set {s}" for s in args.set)
        + f"` ({platform.machine()}, {torch.get_num_threads()} torch thread(s), {total / 60:.1f} min in all).",
        "",
        f"Model: the experiment's pretrained DDPM; sampler {base.sampler.name}, T={T}, eta={base.sampler.eta}, "
        f"grid at its initial spacing `{spacing}`; kernel {base.kernel.type}. Each row: K={args.repeats} "
        f"independent minibatches (fresh noise and fresh real batch), mean +- std of the cosine similarity over "
        f"the {args.repeats * (args.repeats - 1) // 2} pairs of their gradients, w.r.t. the UNet weights and "
        "w.r.t. the grid logits.",
        "",
        "| feature space | gen batch | real batch | cos (weights) | cos (grid) | s / gradient |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['space']} | {r['gen']} | {r['real']} | {r['cos_w']:+.3f} +- {r['cos_w_sd']:.3f} | "
            f"{r['cos_t']:+.3f} +- {r['cos_t_sd']:.3f} | {r['sec']:.2f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out} ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
