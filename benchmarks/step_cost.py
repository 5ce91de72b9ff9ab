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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def cifar10_arch_overrides(work: Path) -> dict:
    """Write a random-weight UNet with the CIFAR-10 DDPM architecture and point the experiment at it."""
    import torch
    from diffusers import UNet2DModel

    from mmdsweep.assets.models import save_denoiser, scheduler_config_for
    from mmdsweep.train.memory import KNOWN_UNET_CONFIGS

    # the architecture of google/ddpm-cifar10-32 (35.7M parameters), randomly initialised:
    # step time and memory do not depend on the weights
    d = work / "cifar10-arch-unet"
    if not (d / "unet").is_dir():
        torch.manual_seed(0)
        unet = UNet2DModel.from_config(KNOWN_UNET_CONFIGS["google/ddpm-cifar10-32"])
        save_denoiser(d, unet, scheduler_config_for(1000, "linear", 1e-4, 0.02))
    return {"model.source": "diffusers", "model.path": str(d), "data.resolution": 32, "data.channels": 3}


def measure(
    experiment: str,
    T: int,
    checkpointing: bool,
    steps: int,
    features: str | None,
    arch: str = "default",
    sets: list[str] | None = None,
) -> dict:
    import torch

    from mmdsweep.config import load_experiment, parse_override
    from mmdsweep.core.sampling import select_timesteps
    from mmdsweep.train.loop import build_setup, kernel_spec, mmd_loss
    from mmdsweep.utils import resolve_device

    overrides: dict = dict(parse_override(x) for x in sets or [])
    overrides.update({"sampler.timesteps": T, "sampler.checkpointing": checkpointing})
    if features:
        overrides["features.train"] = features
    if arch == "cifar10":
        overrides.update(cifar10_arch_overrides(Path(tempfile.gettempdir()) / "mmdsweep-bench"))
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

    # CPU: resident memory before the first step; the process's peak (ru_maxrss) after the steps
    # minus this is the steps' peak, provided setting up peaked lower (reported as setup_peak_mib)
    rss_before = _rss_mib()
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    one_step(0)  # warm-up (allocator, lazy init)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = rss_before
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        one_step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "T": T,
        "checkpointing": checkpointing,
        "sec_per_step": (time.perf_counter() - t0) / steps,
        "activation_mib": saved["peak"] / 2**20,
        "peak_mib": max(0.0, peak - base),
        "memory": "cuda max_memory_allocated - allocated before the steps"
        if device.type == "cuda"
        else "peak RSS (ru_maxrss) - RSS before the first step; glibc keeps freed memory, so "
        "this over-states the live peak (see MALLOC_MMAP_THRESHOLD_ in docs/results.md)",
        "setup_peak_mib": setup_peak - rss_before,
        "batch_size": exp.finetune.batch_size,
        "features": exp.features.train,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "arch": arch,
        "params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", nargs="?", default=str(ROOT / "experiments" / "digits.yaml"))
    ap.add_argument("--timesteps", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--features", help="override features.train")
    ap.add_argument(
        "--arch",
        choices=["default", "cifar10"],
        default="default",
        help="the experiment's UNet, or a random-weight UNet with google/ddpm-cifar10-32's architecture",
    )
    from mmdsweep.config import add_set_argument

    add_set_argument(ap)
    ap.add_argument("--in-process", action="store_true", help="measure all in this process (fine on CUDA)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_cost.md"))
    ap.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        row = measure(
            args.experiment,
            int(args._one[0]),
            args._one[1] == "1",
            args.steps,
            args.features,
            args.arch,
            args.set,
        )
        print("ROW " + json.dumps(row))
        return 0
    rows = []
    for ckpt in (True, False):
        for T in args.timesteps:
            if args.in_process:
                row = measure(args.experiment, T, ckpt, args.steps, args.features, args.arch, args.set)
            else:
                cmd = [
                    sys.executable,
                    __file__,
                    args.experiment,
                    "--steps",
                    str(args.steps),
                    "--arch",
                    args.arch,
                ]
                cmd += ["--_one", str(T), "1" if ckpt else "0"]
                if args.features:
                    cmd += ["--features", args.features]
                cmd += [f"--set={x}" for x in args.set]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                row = json.loads(next(line for line in out.splitlines() if line.startswith("ROW "))[4:])
            rows.append(row)
            print(
                f"T={T:3d} checkpointing={ckpt!s:5}  {row['sec_per_step']:.3f} s/step  "
                f"activations {row['activation_mib']:.1f} MiB  peak {row['peak_mib']:.0f} MiB",
                flush=True,
            )

    lo, hi = min(args.timesteps), max(args.timesteps)

    def ratio(ck: bool, key: str) -> float:
        by_t = {r["T"]: r[key] for r in rows if r["checkpointing"] == ck}
        return by_t[hi] / by_t[lo] if by_t.get(lo) else float("nan")

    r0 = rows[0]
    lines = [
        f"# Fine-tuning step cost ({r0['device']}, UNet {r0['arch']} {r0['params_m']:.1f}M params, "
        f"batch {r0['batch_size']}, features {r0['features']}, {args.steps} timed steps each, "
        f"{time.strftime('%Y-%m-%d')})",
        "",
        f"Peak memory: {r0['memory']}.",
        "",
        "| T | checkpointing | s/step | activation MiB | peak MiB |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ck = "yes" if r["checkpointing"] else "no"
        lines.append(
            f"| {r['T']} | {ck} | {r['sec_per_step']:.3f} | {r['activation_mib']:.1f} | {r['peak_mib']:.0f} |"
        )
    lines += [
        "",
        f"Peak memory T={hi} / T={lo}: with checkpointing {ratio(True, 'peak_mib'):.2f}x, "
        f"without {ratio(False, 'peak_mib'):.2f}x.",
        f"Saved activations T={hi} / T={lo}: with checkpointing {ratio(True, 'activation_mib'):.2f}x, "
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
