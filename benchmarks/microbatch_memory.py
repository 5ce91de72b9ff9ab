"""Peak memory and time per image of one MMD-DDM step: plain vs micro-batched, full vs LoRA, fp32 vs bf16.

Each configuration runs in a fresh subprocess (its own peak). Memory on CPU: the process's peak
resident memory (``ru_maxrss``) during two steps minus the resident memory before the first step
(glibc's large allocations are mmap'd, ``MALLOC_MMAP_THRESHOLD_=65536``, so freed activations go
back to the system and the peak is the live peak); on CUDA ``max_memory_allocated`` minus the
allocation before the steps. Beside it, the estimate of :mod:`mmdsweep.train.memory` for the same
configuration (its ``steps_part``: gradients + activations + chain state, what the measurement sees
above the resident weights and optimizer state).

    python benchmarks/microbatch_memory.py [--arch default|church64|church256|cifar10] [--out benchmarks/results/microbatch_memory.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_ROWS: list[dict[str, Any]] = [
    {"batch": 16, "micro": None},
    {"batch": 64, "micro": None},
    {"batch": 16, "micro": 16},
    {"batch": 64, "micro": 16},
    {"batch": 128, "micro": 16},
    {"batch": 64, "micro": 16, "adapter": "lora"},
    {"batch": 64, "micro": 16, "precision": "bf16"},
]
CHURCH_ROWS: list[dict[str, Any]] = [
    {"batch": 4, "micro": None},
    {"batch": 4, "micro": 1},
]
SMOKE_ROWS: list[dict[str, Any]] = [
    {"batch": 8, "micro": None},
    {"batch": 8, "micro": 4},
    {"batch": 8, "micro": 4, "adapter": "lora"},
]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def build(arch: str, row: dict[str, Any], device: Any) -> tuple[Any, Any]:
    """An in-memory setup: random UNet of the architecture, a frozen random conv feature net, a random bank."""
    import torch
    from diffusers import UNet2DModel

    from mmdsweep.assets.components import ModelSource
    from mmdsweep.assets.models import Denoiser, build_unet, scheduler_config_for
    from mmdsweep.config import from_dict
    from mmdsweep.core.sampling import NoiseSchedule
    from mmdsweep.train.loop import Setup
    from mmdsweep.train.memory import KNOWN_UNET_CONFIGS

    torch.manual_seed(0)
    if arch == "default":
        res, ch, T, feats = 16, 1, 5, "classifier"
        unet = build_unet(res, ch, (32, 64, 64))
    elif arch in ("church64", "church256"):  # google/ddpm-ema-church-256's architecture at 64x64 / full size
        res, ch, T, feats = (64 if arch == "church64" else 256), 3, 2, "inception"
        cfg = {**KNOWN_UNET_CONFIGS["google/ddpm-ema-church-256"], "sample_size": res}
        unet = UNet2DModel.from_config(cfg)
    elif arch == "cifar10":  # google/ddpm-cifar10-32's architecture (35.7M), mobilenet_v2 features at 32x32
        res, ch, T, feats = 32, 3, 5, "torchvision:mobilenet_v2"
        unet = UNet2DModel.from_config(KNOWN_UNET_CONFIGS["google/ddpm-cifar10-32"])
    elif arch == "tiny":
        res, ch, T, feats = 8, 1, 2, "classifier"
        unet = build_unet(res, ch, (16, 32))
    else:
        raise SystemExit(f"unknown arch {arch}")
    raw = {
        "data": {"dataset": "digits", "resolution": res},
        "sampler": {"name": "ddim", "timesteps": row.get("T", T), "checkpointing": row.get("ckpt", True)},
        "features": {
            "train": feats,
            "eval": feats,
            "train_resize": res if feats.startswith("torchvision:") else None,
        },
        "finetune": {
            "batch_size": row["batch"],
            "micro_batch_size": row["micro"],
            "adapter": row.get("adapter", "none"),
            "precision": row.get("precision", "fp32"),
            "threads": 1,
        },
    }
    exp = from_dict(raw)
    cfg_sched = scheduler_config_for(1000, "linear", 1e-4, 0.02)
    den = Denoiser(
        unet=unet.to(device),
        schedule=NoiseSchedule.from_scheduler_config(cfg_sched),
        scheduler_config=cfg_sched,
    )
    if feats == "inception":
        import torchvision

        net = torchvision.models.inception_v3(aux_logits=False, init_weights=False)
        net.fc = torch.nn.Identity()  # type: ignore[assignment]

        class Space(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                x = torch.nn.functional.interpolate(
                    x.float(), size=(299, 299), mode="bilinear", align_corners=False
                )
                return self.net(x)  # type: ignore[no-any-return]

        space: torch.nn.Module = Space()
        dim = 2048
    elif feats == "torchvision:mobilenet_v2":
        import torchvision

        space = torchvision.models.mobilenet_v2(num_classes=1280)
        space.classifier = torch.nn.Identity()  # type: ignore[assignment]
        dim = 1280
    else:
        dim = 64
        space = torch.nn.Sequential(
            torch.nn.Conv2d(ch, 16, 3, padding=1),
            torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(4),
            torch.nn.Flatten(),
            torch.nn.Linear(256, dim),
        )
    space = space.to(device).eval().requires_grad_(False)

    class Bank:
        pool = torch.randn(512, dim, generator=torch.Generator().manual_seed(1)).to(device)

        def sample(self, n: int, g: Any) -> Any:
            return self.pool[torch.randperm(512, generator=g)[:n].to(device)]

        def to(self, d: Any) -> Any:
            return self

    setup = Setup(exp, device, den, space, Bank(), None, ModelSource("<memory>", None))
    return exp, setup


def measure(arch: str, row: dict[str, Any], steps: int, device_name: str) -> dict[str, Any]:
    import torch

    from mmdsweep.core.sampling import select_timesteps
    from mmdsweep.train import adapters
    from mmdsweep.train.loop import kernel_spec, mmd_step, prepare_model
    from mmdsweep.train.memory import estimate

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device(device_name)
    exp, setup = build(arch, row, device)
    model, eps = prepare_model(setup, setup.denoiser.unet)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-5)
    ts = select_timesteps(exp.sampler.timesteps, 1000)
    spec = kernel_spec(exp)
    # optimizer state exists before we measure (as in a run after step 1)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mib()
    t0 = time.perf_counter()
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        mmd_step(setup, eps, i, ts, spec, 64)
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    dt = (time.perf_counter() - t0) / steps
    trainable, total = adapters.count_trainable(model)
    est = estimate(
        exp,
        config=dict(setup.denoiser.unet.config)
        if not adapters.is_adapter(model)
        else dict(model.get_base_model().config),  # type: ignore[operator]
    )
    return {
        **row,
        "arch": arch,
        "T": exp.sampler.timesteps,
        "s_per_step": dt,
        "ms_per_image": 1000 * dt / row["batch"],
        "peak_mib": peak - before,
        "estimate_mib": est.steps_part if est else float("nan"),
        "trainable_m": trainable / 1e6,
        "params_m": total / 1e6,
        "device": device_name,
    }


def run_rows(arch: str, rows: list[dict[str, Any]], steps: int, device: str) -> list[dict[str, Any]]:
    out = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    for row in rows:
        cmd = [
            sys.executable,
            __file__,
            "--arch",
            arch,
            "--steps",
            str(steps),
            "--device",
            device,
            "--_one",
            json.dumps(row),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"row {row} failed")
        got = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("ROW "))[4:])
        print(json.dumps(got), flush=True)
        out.append(got)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| batch | micro-batch | adapter | precision | trainable M | s/step | ms/image | peak MiB (measured) | estimate MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['micro'] or '-'} | {r.get('adapter', 'none')} | {r.get('precision', 'fp32')} | "
            f"{r['trainable_m']:.3f} | {r['s_per_step']:.2f} | {r['ms_per_image']:.1f} | {r['peak_mib']:.0f} | {r['estimate_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--arch", default="default", choices=["default", "church64", "church256", "cifar10", "tiny"]
    )
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--smoke", action="store_true", help="three tiny rows (tests)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "microbatch_memory.md"))
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        print("ROW " + json.dumps(measure(args.arch, json.loads(args._one), args.steps, args.device)))
        return 0
    rows = SMOKE_ROWS if args.smoke else CHURCH_ROWS if args.arch.startswith("church") else DEFAULT_ROWS
    arch = "tiny" if args.smoke else args.arch
    got = run_rows(arch, rows, args.steps, args.device)
    head = (
        f"# One MMD-DDM step: plain vs micro-batched (arch {arch}, T={got[0]['T']}, per-step checkpointing, "
        f"device {args.device}, {args.steps} timed steps, {time.strftime('%Y-%m-%d')})\n\n"
        "Peak = process peak RSS during the steps minus RSS before them (CPU; live peak, large buffers mmap'd) "
        "or cuda max_memory_allocated minus allocated before (GPU). Estimate = mmdsweep.train.memory's "
        "grads + activations + chain state for the same configuration.\n\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(head + table(got) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(got, indent=2))
    print(table(got))
    return 0


if __name__ == "__main__":
    sys.exit(main())
