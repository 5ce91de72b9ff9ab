"""A short GPU check of the engine (run on a CUDA machine; prints what it finds).

1. The samplers give the same images on CUDA as on the CPU (same model, same noise).
2. A feature space (MobileNetV2) on CUDA: features match the CPU's, input gradients are finite.
3. Fine-tuning step cost and peak CUDA memory for T = 5, 10, 20 with and without per-step
   checkpointing, for the digits UNet and for google/ddpm-cifar10-32's architecture.
4. MMD-DDM fine-tuning of the embedded default at T=5 on CUDA: FID before -> after, wall time.
5. Real scale (cifar10 architecture, 35.7M parameters, batch 128 per GPU in micro-batches of 32,
   per-step checkpointing, mobilenet_v2 features at 32x32): step time, peak memory and model FLOP
   utilisation at T = 5/10/20 for full fine-tuning fp32 / bf16 and LoRA bf16; written to
   ``benchmarks/results/gpu_check_scale_<gpu>.md``. Each row runs in a fresh process.

    python benchmarks/gpu_check.py [--cache DIR] [--out DIR]      # < 8 minutes on one H100/H200
    python benchmarks/gpu_check.py --smoke                        # section 5 only, tiny sizes, CPU

MFU = model FLOPs per second / the GPU's dense peak (bf16 tensor-core peak for bf16, fp32 for fp32),
with model FLOPs = 3 x (UNet forward FLOPs) x T per image (forward + backward; the recomputation of
checkpointing and the no-grad pass of micro-batching are overhead, not model FLOPs). HFU counts them
(5 x forward x T per image with micro-batching and checkpointing). Forward FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions).
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
    ap.add_argument("--smoke", action="store_true", help="only section 5, tiny sizes, on the CPU (a test)")
    ap.add_argument("--scale-only", action="store_true", help="only section 5")
    args = ap.parse_args()
    import torch

    if args.smoke or args.scale_only:
        return scale_section(Path(args.out), smoke=args.smoke, device="cpu" if args.smoke else args.device)

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
    assert xg.grad is not None
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
    return scale_section(out, smoke=False, device=args.device)


#: dense peak TFLOP/s (no sparsity) by precision
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "A10G": {"bf16": 70.0, "fp32": 35.0},
}


def _peak(name: str, precision: str) -> float:
    for key, v in PEAK_TFLOPS.items():
        if key in name:
            return v["bf16" if precision == "bf16" else "fp32"] * 1e12
    return float("nan")


def unet_forward_flops(arch: str) -> float:
    """FLOPs of one UNet forward per image (FlopCounterMode at batch 1, on the CPU)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from microbatch_memory import build

    _, setup = build(arch, {"batch": 2, "micro": None}, torch.device("cpu"))
    unet = setup.denoiser.unet
    c = setup.denoiser.channels
    r = setup.denoiser.resolution
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        unet(torch.randn(1, c, r, r), torch.tensor([500]))
    return float(fc.get_total_flops())


def scale_section(out: Path, *, smoke: bool, device: str) -> int:
    """Section 5: step time, peak memory and MFU of micro-batched MMD-DDM steps (rows in fresh processes)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from microbatch_memory import run_rows

    arch = "tiny" if smoke else "cifar10"
    Ts = [2] if smoke else [5, 10, 20]
    batch, micro = (4, 2) if smoke else (128, 32)
    variants = (
        [("none", "fp32"), ("lora", "bf16")]
        if smoke
        else [("none", "fp32"), ("none", "bf16"), ("lora", "bf16")]
    )
    rows = [
        {"batch": batch, "micro": micro, "T": T, "ckpt": True, "adapter": a, "precision": p}
        for T in Ts
        for a, p in variants
    ]
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    t0 = time.time()
    got = run_rows(arch, rows, 1 if smoke else 2, device)
    flops = unet_forward_flops(arch)
    lines = [
        f"# GPU check, real scale ({gpu}; arch {arch}, batch {batch} per GPU in micro-batches of {micro}, "
        f"per-step checkpointing; {time.strftime('%Y-%m-%d')})",
        "",
        f"UNet forward: {flops / 1e9:.2f} GFLOP per image. MFU = 3 x forward x T per image / step time / peak; "
        "HFU adds the recomputation and the no-grad pass (5 x forward x T).",
        "",
        "| T | weights | precision | trainable M | s/step | ms/image | peak MiB | estimate MiB | MFU | HFU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in got:
        peak = _peak(gpu, r["precision"])
        per_s = r["batch"] / r["s_per_step"]
        mfu = 3 * flops * r["T"] * per_s / peak
        hfu = 5 * flops * r["T"] * per_s / peak
        lines.append(
            f"| {r['T']} | {r.get('adapter', 'none')} | {r['precision']} | {r['trainable_m']:.2f} | "
            f"{r['s_per_step']:.3f} | {r['ms_per_image']:.2f} | {r['peak_mib']:.0f} | {r['estimate_mib']:.0f} | "
            f"{mfu:.1%} | {hfu:.1%} |"
        )
    lines += ["", f"Section 5 wall time {time.time() - t0:.0f} s."]
    tag = (
        "smoke" if smoke else "".join(ch for ch in gpu.lower().replace(" ", "_") if ch.isalnum() or ch == "_")
    )
    path = out / f"gpu_check_{tag}.md"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    print(f"[5] wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
