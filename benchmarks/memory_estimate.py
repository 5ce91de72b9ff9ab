"""How good is the ``--dry-run`` memory estimate? Estimate vs measured peaks, and the LSUN verdicts.

1. CUDA (NVIDIA H200, an earlier session): ``benchmarks/results/step_cost_cuda_{default,cifar10}.md``
   measured ``max_memory_allocated`` minus the allocation before the steps (weights, optimizer
   state and the feature network are already resident), batch 64, mobilenet_v2 features at 32x32,
   T = 5/10/20 with and without per-step checkpointing; compared with the estimate's ``steps_part``
   (gradients + UNet activations + feature activations + chain state).
2. CPU: the rows of ``benchmarks/results/microbatch_memory*.json`` (peak RSS, fresh processes).
3. ``experiments/lsun.yaml`` per worker on g5.12xlarge (A10G 24 GB) and p4d.24xlarge (A100 40 GB):
   the estimate, beside the peak measured for the same architecture at the real 256x256 on the CPU
   (``benchmarks/microbatch_memory.py --arch church256``; T=2: with per-step checkpointing the peak
   does not depend on T).

    python benchmarks/memory_estimate.py [--out benchmarks/results/memory_estimate.md]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "benchmarks" / "results"


def _cuda_rows(name: str) -> list[tuple[int, bool, float]]:
    path = RES / f"step_cost_cuda_{name}.md"
    rows = []
    for line in path.read_text().splitlines():
        m = re.match(r"\| (\d+) \| (yes|no) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", line)
        if m:
            rows.append((int(m.group(1)), m.group(2) == "yes", float(m.group(3))))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(RES / "memory_estimate.md"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from mmdsweep.config import load_experiment
    from mmdsweep.train.memory import GPU_MEMORY_MIB, KNOWN_UNET_CONFIGS, estimate, probe_unet

    out = ["# Memory estimate vs measured peaks", ""]
    out += [
        "Estimates by `mmdsweep.train.memory` (what `--dry-run` prints); measured peaks from the files named.",
        "",
        "## 1. CUDA (H200, benchmarks/results/step_cost_cuda_*.md; batch 64, mobilenet_v2 at 32x32, fp32)",
        "",
        "| UNet | T | checkpointing | measured MiB | estimate MiB | estimate / measured |",
        "|---|---|---|---|---|---|",
    ]
    digits = load_experiment(ROOT / "experiments" / "digits.yaml")
    base = digits.with_overrides({"finetune.batch_size": 64, "finetune.ema_decay": None})
    default_cfg = dict(
        __import__("mmdsweep.assets.models", fromlist=["build_unet"]).build_unet(16, 1, (32, 64, 64)).config
    )
    cifar_cfg = KNOWN_UNET_CONFIGS["google/ddpm-cifar10-32"]
    probes: dict[str, Any] = {}
    for name, cfg in (("default", default_cfg), ("cifar10", cifar_cfg)):
        probes[name] = probe_unet(cfg, "fp32", None)
        for T, ckpt, measured in _cuda_rows(name):
            exp = base.with_overrides({"sampler.timesteps": T, "sampler.checkpointing": ckpt})
            est = estimate(exp, config=cfg, probe=probes[name])
            assert est is not None
            out.append(
                f"| {name} ({est.params / 1e6:.1f}M) | {T} | {'yes' if ckpt else 'no'} | {measured:.0f} | "
                f"{est.steps_part:.0f} | {est.steps_part / measured:.2f} |"
            )
    out += ["", "## 2. CPU (peak RSS in fresh processes, benchmarks/results/microbatch_memory*.json)", ""]
    out += [
        "| arch | batch | micro | adapter | precision | measured MiB | estimate MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in sorted(RES.glob("microbatch_memory*.json")):
        for r in json.loads(f.read_text()):
            out.append(
                f"| {r['arch']} | {r['batch']} | {r['micro'] or '-'} | {r.get('adapter', 'none')} | "
                f"{r.get('precision', 'fp32')} | {r['peak_mib']:.0f} | {r['estimate_mib']:.0f} |"
            )
    out += ["", "## 3. experiments/lsun.yaml per worker (batch 4 per GPU, T=10, Inception features, EMA)", ""]
    lsun = load_experiment(ROOT / "experiments" / "lsun.yaml")
    church = KNOWN_UNET_CONFIGS["google/ddpm-ema-church-256"]
    p_fp32 = probe_unet(church, "fp32", None)
    # measured at the real resolution (256x256) on CPU: benchmarks/microbatch_memory.py --arch church256
    measured: dict[Any, dict[str, Any]] = {}
    mf = RES / "microbatch_memory_church256.json"
    if mf.is_file():
        measured = {r["micro"]: r for r in json.loads(mf.read_text())}
        out += [
            "Measured: one MMD-DDM step of the google/ddpm-ema-church-256 architecture (113.7M parameters, random "
            "weights) at 256x256 on the CPU, batch 4, T=2, per-step checkpointing, Inception-V3 features at "
            "299x299, fp32 (`benchmarks/microbatch_memory.py --arch church256 --steps 1`, peak RSS in a fresh "
            "process minus the RSS before the step, glibc's large buffers mmap'd so freed memory is returned). "
            "With per-step checkpointing the peak does not depend on T beyond the chain state (T+3 images per "
            "image in the batch, < 4 MiB here), so the T=2 measurement stands for lsun.yaml's T=10.",
            "",
            "| configuration | estimate: steps part MiB (T=2) | measured MiB | estimate / measured |",
            "|---|---|---|---|",
        ]
        for micro, label in ((None, "batch 4 (as in lsun.yaml)"), (1, "batch 4, micro_batch_size 1")):
            if micro not in measured:
                continue
            exp = lsun.with_overrides({"sampler.timesteps": 2, "finetune.micro_batch_size": micro})
            est = estimate(exp, config=church, probe=p_fp32)
            assert est is not None
            m = measured[micro]["peak_mib"]
            out.append(f"| {label} | {est.steps_part:.0f} | {m:.0f} | {est.steps_part / m:.2f} |")
        out.append("")
    out += [
        "| configuration | GPU | estimate GiB (peak incl. context) | fits | measured-based GiB |",
        "|---|---|---|---|---|",
    ]
    variants: list[tuple[str, dict[str, Any]]] = [
        ("as in lsun.yaml (fp32, checkpointing)", {}),
        ("no checkpointing", {"sampler.checkpointing": False}),
        ("bf16", {"finetune.precision": "bf16"}),
        ("micro_batch_size 1", {"finetune.micro_batch_size": 1}),
        ("LoRA r=8", {"finetune.adapter": "lora"}),
        ("batch 32 per GPU", {"finetune.batch_size": 32}),
        (
            "batch 32 per GPU, micro 4, bf16",
            {"finetune.batch_size": 32, "finetune.micro_batch_size": 4, "finetune.precision": "bf16"},
        ),
    ]
    p_cache: dict[tuple[str, bool], Any] = {("fp32", False): p_fp32}
    for label, ov in variants:
        exp = lsun.with_overrides(ov)
        key = (exp.finetune.precision, exp.finetune.adapter == "lora")
        if key not in p_cache:
            p_cache[key] = probe_unet(church, key[0], exp.finetune.lora if key[1] else None)
        for gpu in ("A10G", "A100-40GB"):
            est = estimate(exp, config=church, probe=p_cache[key], gpu_type=gpu)
            assert est is not None
            based = ""
            m = (
                measured.get(exp.finetune.micro_batch_size)
                if not ov or set(ov) == {"finetune.micro_batch_size"}
                else None
            )
            if m is not None:
                # resident weights/optimizer/EMA/feature network from the estimate + the measured steps part,
                # with the same fragmentation/context allowance the estimate adds
                ratio = est.total / est.allocated
                based = f"{(est.allocated - est.steps_part + m['peak_mib']) * ratio / 1024:.1f}"
            out.append(
                f"| {label} | {gpu} ({GPU_MEMORY_MIB[gpu] / 1024:.0f} GiB) | {est.total / 1024:.1f} | "
                f"{'yes' if est.fits() else 'NO'} | {based or '-'} |"
            )
    out.append("")
    out.append(
        "Measured-based column: the estimate's resident part (weights, Adam state, EMA, feature network) plus the "
        "step's peak measured on the CPU at 256x256, times the estimate's own allowance for fragmentation and the "
        "CUDA context. A CPU peak is not a CUDA peak (no caching allocator, no cuDNN workspaces); on a GPU run "
        "`benchmarks/gpu_check.py` to measure it (not run: no GPU was lent to this session)."
    )
    Path(args.out).write_text("\n".join(out) + "\n")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
