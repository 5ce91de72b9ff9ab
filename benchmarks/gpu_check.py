"""A short GPU check of the engine (run on a CUDA machine; prints what it finds).

1. The samplers give the same images on CUDA as on the CPU (same model, same noise).
2. A feature space (MobileNetV2) on CUDA: features match the CPU's, input gradients are finite.
3. Fine-tuning step cost and peak CUDA memory for T = 5, 10, 20 with and without per-step
   checkpointing, for the digits UNet and for google/ddpm-cifar10-32's architecture.
4. MMD-DDM fine-tuning of the embedded default at T=5 on CUDA: FID before -> after, wall time.

    python benchmarks/gpu_check.py [--cache DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "digits.yaml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None, help="pretrain.cache_dir holding the pretrained digits model")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument(
        "--device", default="cuda", help="cuda (the point of this script), or cpu for a smoke test"
    )
    ap.add_argument("--skip-step-cost", action="store_true")
    args = ap.parse_args()
    import torch

    from mmdsweep.config import load_experiment
    from mmdsweep.core.sampling import sample, select_timesteps
    from mmdsweep.train.loop import LocalReporter, build_setup, run_finetune

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}", flush=True)
    overrides = {"pretrain.cache_dir": args.cache} if args.cache else {}
    exp = load_experiment(DIGITS, overrides)

    # 1. samplers: CUDA vs CPU
    cpu = build_setup(exp, torch.device("cpu"), evaluate=False)
    gpu = build_setup(exp, dev, evaluate=False)
    noise = torch.randn((16, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    for sampler in ("ddim", "dpmpp_2m"):
        ts = select_timesteps(10, 1000)
        with torch.no_grad():
            a = sample(cpu.denoiser.eps_fn(), noise, cpu.denoiser.schedule, ts, sampler=sampler)
            b = sample(gpu.denoiser.eps_fn(), noise.to(dev), gpu.denoiser.schedule, ts, sampler=sampler)
        print(f"[1] {sampler} T=10: max |cuda - cpu| = {(a - b.cpu()).abs().max().item():.2e}", flush=True)

    # 2. feature space on CUDA
    x = torch.rand((8, 1, 16, 16)) * 2 - 1
    fc = cpu.train_space(x)
    xg = x.to(dev).requires_grad_(True)
    fg = gpu.train_space(xg)
    fg.sum().backward()
    rel = ((fc - fg.detach().cpu()).norm() / fc.norm()).item()
    print(
        f"[2] {exp.features.train}: rel. diff cuda/cpu {rel:.2e}; input grad finite "
        f"{bool(torch.isfinite(xg.grad).all())}, |grad| {xg.grad.norm().item():.3e}",
        flush=True,
    )

    # 3. step cost (its own script, in-process on CUDA)
    for arch in () if args.skip_step_cost else ("default", "cifar10"):
        cmd = [sys.executable, str(ROOT / "benchmarks" / "step_cost.py"), str(DIGITS), "--in-process"]
        cmd += ["--arch", arch, "--steps", "3", "--out", str(out / f"step_cost_cuda_{arch}.md")]
        cmd += [f"--set={k}={v}" for k, v in overrides.items()]
        t0 = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True)
        print(f"[3] step_cost --arch {arch} ({time.time() - t0:.0f} s, rc {res.returncode}):", flush=True)
        print(res.stdout[-3000:] if res.returncode == 0 else res.stderr[-3000:], flush=True)

    # 4. fine-tuning on CUDA
    run_exp = exp.with_overrides(
        {
            "finetune.steps": args.finetune_steps,
            "finetune.eval_every": args.finetune_steps,
            "finetune.device": "cuda",
        }
    )
    t0 = time.time()
    summary = run_finetune(run_exp, LocalReporter(out / "gpu_finetune_run"), device=dev)
    wall = time.time() - t0
    st = summary.state
    after = summary.after
    print(
        f"[4] MMD-DDM digits T=5, {args.finetune_steps} steps on {name} in {wall:.0f} s: "
        f"FID[{exp.features.eval}] {st.fid_before:.3f} -> {after.fid if after else float('nan'):.3f}, "
        f"KID {st.kid_before:.5f} -> {after.kid if after else float('nan'):.5f} ({exp.eval.num_samples} samples)",
        flush=True,
    )
    if after:
        print("    per space: " + json.dumps(after.per_space), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
