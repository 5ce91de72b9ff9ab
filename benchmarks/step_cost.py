"""Time per MMD-DDM fine-tuning step and peak memory, for T = 5, 10, 20, with and without
per-step activation checkpointing, on the embedded default (digits, 16x16).

Each configuration runs in a fresh subprocess so that its peak resident memory is its own.
Memory is reported two ways:
  * activation bytes: the tensors autograd saves for the backward pass (exact, via
    saved_tensors_hooks), the part that grows with T without checkpointing;
  * peak RSS delta: the process's peak resident memory during the steps minus the resident
    memory before the first step (on CUDA: torch.cuda.max_memory_allocated instead).

    python benchmarks/step_cost.py [experiments/digits.yaml] [--steps 3] [--out benchmarks/results/step_cost.md]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def measure(experiment: str, T: int, checkpointing: bool, steps: int, features: str | None) -> dict:
    import torch

    from mmdsweep.config import load_experiment
    from mmdsweep.finetune import build_setup, kernel_spec, mmd_loss
    from mmdsweep.sampling import select_timesteps
    from mmdsweep.utils import resolve_device

    overrides = {"sampler.timesteps": T, "sampler.checkpointing": checkpointing}
    if features:
        overrides["features.train"] = features
    exp = load_experiment(experiment, overrides)
    device = resolve_device(exp.finetune.device)
    setup = build_setup(exp, device, evaluate=False)
    unet = setup.denoiser.unet.train()
    opt = torch.optim.Adam(unet.parameters(), lr=exp.finetune.lr)
    ts = select_timesteps(T, setup.denoiser.schedule.num_train_timesteps)
    spec = kernel_spec(exp)
    saved = {"cur": 0, "peak": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved["cur"] += t.numel() * t.element_size()
        saved["peak"] = max(saved["peak"], saved["cur"])
        return t

    def one_step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        saved["cur"] = 0
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = mmd_loss(
                setup, unet, i, ts, spec, exp.finetune.real_batch_size or exp.finetune.batch_size
            )
        loss.backward()
        opt.step()

    one_step(0)  # warm-up (allocator, lazy init)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        one_step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / steps
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {
        "T": T,
        "checkpointing": checkpointing,
        "sec_per_step": sec,
        "activation_mib": saved["peak"] / 2**20,
        "peak_rss_delta_mib": max(0.0, peak_after - max(base_rss, peak_before))
        if device.type != "cuda"
        else None,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "batch_size": exp.finetune.batch_size,
        "features": exp.features.train,
        "device": str(device),
    }
    # RSS peak is dominated by the largest single step; report the ratio-friendly activation bytes too
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", nargs="?", default=str(ROOT / "experiments" / "digits.yaml"))
    ap.add_argument("--timesteps", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--features", help="override features.train")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_cost.md"))
    ap.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        row = measure(args.experiment, int(args._one[0]), args._one[1] == "1", args.steps, args.features)
        print("ROW " + json.dumps(row))
        return 0
    rows = []
    for ckpt in (True, False):
        for T in args.timesteps:
            cmd = [
                sys.executable,
                __file__,
                args.experiment,
                "--steps",
                str(args.steps),
                "--_one",
                str(T),
                "1" if ckpt else "0",
            ]
            if args.features:
                cmd += ["--features", args.features]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row = json.loads(next(line for line in out.splitlines() if line.startswith("ROW "))[4:])
            rows.append(row)
            print(
                f"T={T:3d} checkpointing={ckpt!s:5}  {row['sec_per_step']:.2f} s/step  "
                f"activations {row['activation_mib']:.1f} MiB  peak RSS delta {row['peak_rss_delta_mib']}",
                flush=True,
            )

    def ratio(ck: bool, key: str) -> float:
        by_t = {r["T"]: r[key] for r in rows if r["checkpointing"] == ck}
        lo, hi = min(args.timesteps), max(args.timesteps)
        return by_t[hi] / by_t[lo] if by_t.get(lo) else float("nan")

    lines = [
        f"# Fine-tuning step cost ({rows[0]['device']}, batch {rows[0]['batch_size']}, features {rows[0]['features']}, "
        f"{args.steps} timed steps each, {time.strftime('%Y-%m-%d')})",
        "",
        "| T | checkpointing | s/step | activation MiB | peak RSS delta MiB |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        rss = "n/a" if r["peak_rss_delta_mib"] is None else f"{r['peak_rss_delta_mib']:.0f}"
        lines.append(
            f"| {r['T']} | {'yes' if r['checkpointing'] else 'no'} | {r['sec_per_step']:.2f} | {r['activation_mib']:.1f} | {rss} |"
        )
    lo, hi = min(args.timesteps), max(args.timesteps)
    lines += [
        "",
        f"Activation memory T={hi} / T={lo}: with checkpointing {ratio(True, 'activation_mib'):.2f}x, "
        f"without {ratio(False, 'activation_mib'):.2f}x.",
        f"Step time T={hi} / T={lo}: with checkpointing {ratio(True, 'sec_per_step'):.2f}x, "
        f"without {ratio(False, 'sec_per_step'):.2f}x.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
