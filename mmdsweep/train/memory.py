"""Know before you launch: per-worker peak accelerator memory of a fine-tuning configuration.

The estimate adds, per worker (all in MiB):

* **weights**: the UNet's parameters in float32 (plus the frozen feature network's), an EMA copy;
* **grads + optimizer**: float32 gradients and Adam's two moments of the *trainable* parameters
  (all of the UNet's, or only the LoRA adapters');
* **UNet activations**: the bytes autograd saves in one UNet call per image, measured by running the
  real architecture (random weights, CPU) at batch 1 and 2 under ``saved_tensors_hooks`` with
  storages de-duplicated and parameters excluded, under the configured autocast precision and
  with the LoRA wrappers if any. Architectures above 64x64 are probed at 64x64 and scaled by the
  pixel count (convolutions dominate; attention maps at these sizes are small). Without per-step
  checkpointing the chain keeps T calls' activations; with it, one call's (recomputed during the
  backward) plus the T step inputs. Per micro-batch when ``finetune.micro_batch_size`` is set,
  else for the whole per-worker batch;
* **feature network activations** for the same images (a measured per-image table, below);
* a **CUDA context** (~500 MiB, outside the allocator) and 10% for the caching allocator's
  fragmentation when judging whether it fits.

``benchmarks/memory_estimate.py`` compares the estimate with measured peaks (CPU, and the CUDA
numbers of ``benchmarks/results/step_cost_cuda_*.md``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MiB = 2**20

#: usable memory per GPU (MiB, as ``nvidia-smi`` reports the total)
GPU_MEMORY_MIB: dict[str, int] = {
    "A10G": 23_028,  # 24 GB (g5.*)
    "A100-40GB": 40_960,  # p4d.24xlarge
    "A100-80GB": 81_920,  # p4de.24xlarge
    "H100": 81_559,  # 80 GB (p5.48xlarge)
    "H200": 143_771,  # 141 GB (p5e/p5en)
}
CUDA_CONTEXT_MIB = 500.0
FRAGMENTATION = 1.10

#: saved activations of the feature network's backward, MiB per image at its input size,
#: measured with :func:`saved_activation_bytes` (float32; random weights; torch 2.14, CPU).
#: inception: torchvision's Inception-v3 at 299x299 as a stand-in for clean-fid's TorchScript
#: file (the same network); clip: open_clip ViT-B-32 at 224x224.
FEATURE_ACT_MIB_PER_IMAGE: dict[str, float] = {
    "inception": 93.6,
    "clip": 18.5,
    "torchvision:mobilenet_v2": 74.6,
    "torchvision:resnet18": 21.2,
    "classifier": 0.05,
}
#: the input size at which the table above was measured (the network's native size); the
#: activations scale with the pixel count of the size actually used (``features.train_resize``)
FEATURE_NATIVE_SIZE: dict[str, int] = {
    "inception": 299,
    "clip": 224,
    "torchvision:mobilenet_v2": 224,
    "torchvision:resnet18": 224,
    "classifier": 0,  # the data resolution
}
FEATURE_PARAMS_M: dict[str, float] = {
    "inception": 23.8,
    "clip": 87.8,
    "torchvision:mobilenet_v2": 3.5,
    "torchvision:resnet18": 11.7,
    "classifier": 0.1,
}

#: what the google/ddpm-* UNet configs share
_DDPM_UNET_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "attention_head_dim": None,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-06,
}

#: the UNet configs of the Hub models used by the real-scale experiments (copied from their
#: ``unet/config.json``), so that an estimate needs no download
KNOWN_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "google/ddpm-cifar10-32": {
        **_DDPM_UNET_CONFIG,
        "sample_size": 32,
        "block_out_channels": [128, 256, 256, 256],
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    },
    "google/ddpm-ema-church-256": {
        **_DDPM_UNET_CONFIG,
        "sample_size": 256,
        "block_out_channels": [128, 128, 256, 256, 512, 512],
        "down_block_types": [
            "DownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
            "DownBlock2D",
            "AttnDownBlock2D",
            "DownBlock2D",
        ],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
    },
}
KNOWN_UNET_CONFIGS["google/ddpm-church-256"] = KNOWN_UNET_CONFIGS["google/ddpm-ema-church-256"]
KNOWN_UNET_CONFIGS["google/ddpm-celebahq-256"] = KNOWN_UNET_CONFIGS["google/ddpm-ema-church-256"]
KNOWN_UNET_CONFIGS["google/ddpm-ema-celebahq-256"] = KNOWN_UNET_CONFIGS["google/ddpm-ema-church-256"]

PROBE_MAX_RES = 64


def saved_activation_bytes(fn: Callable[[int], torch.Tensor], batch: int, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn(batch)`` runs (``exclude``: storage ptrs)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in exclude and ptr != 0:
                seen[ptr] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # pragma: no cover - e.g. sparse
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(batch)
    del out
    return sum(seen.values())


def per_image_activation_mib(
    module: torch.nn.Module, fn: Callable[[int], torch.Tensor]
) -> tuple[float, float]:
    """(per-call constant, per-image) MiB from batch 1 and 2 (autocast weight copies land in the constant)."""
    exclude = {p.untyped_storage().data_ptr() for p in module.parameters()}
    a1 = saved_activation_bytes(fn, 1, exclude)
    a2 = saved_activation_bytes(fn, 2, exclude)
    per_image = max(a2 - a1, 0)
    return max(a1 - per_image, 0) / MiB, per_image / MiB


def unet_config(exp: Any) -> dict[str, Any] | None:
    """The UNet's config: from the model directory when on disk, else a known Hub id, else the embedded default's."""
    if exp.model.source == "pretrain":
        p = exp.pretrain
        from mmdsweep.assets.models import build_unet

        channels = exp.data.channels or (1 if exp.data.dataset == "digits" else 3)
        unet = build_unet(
            exp.data.resolution, channels, p.block_out_channels, p.layers_per_block, p.attention
        )
        return dict(unet.config)
    path = exp.model.path
    try:
        from mmdsweep.assets.models import resolve_model_dir

        root = resolve_model_dir(path, exp.model.revision)
        for cand in (root / (exp.model.unet_subfolder or "unet") / "config.json", root / "config.json"):
            if cand.is_file():
                return dict(json.loads(cand.read_text()))
    except Exception:  # noqa: BLE001 - not on disk: fall back to the table
        pass
    return KNOWN_UNET_CONFIGS.get(str(path))


@dataclass
class UnetProbe:
    params: int
    trainable: int
    const_mib: float
    per_image_mib: float
    probe_resolution: int


def probe_unet(config: dict[str, Any], precision: str, lora: dict[str, Any] | None) -> UnetProbe:
    """Parameter counts and saved activations per image of one UNet call (random weights, CPU)."""
    from diffusers import UNet2DModel

    from mmdsweep.train.precision import unet_autocast

    res = int(config["sample_size"] if isinstance(config["sample_size"], int) else config["sample_size"][0])
    probe_res = min(res, PROBE_MAX_RES)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg["sample_size"] = probe_res
    torch.manual_seed(0)
    unet: torch.nn.Module = UNet2DModel.from_config(cfg)
    params = sum(p.numel() for p in unet.parameters())
    if lora is not None:
        from mmdsweep.train.adapters import apply_lora

        unet = apply_lora(unet, lora)
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    ch = int(cfg.get("in_channels", 3))

    def fn(b: int) -> torch.Tensor:
        x = torch.randn(b, ch, probe_res, probe_res)
        with unet_autocast(precision, torch.device("cpu")):
            return unet(x, torch.full((b,), 500)).sample  # type: ignore[no-any-return]

    const, per_image = per_image_activation_mib(unet, fn)
    scale = (res / probe_res) ** 2
    return UnetProbe(params, trainable, const, per_image * scale, probe_res)


@dataclass
class MemoryEstimate:
    """Per-worker peak accelerator memory, by component (MiB)."""

    weights: float
    grads: float
    optimizer: float
    ema: float
    unet_activations: float
    feature_network: float
    feature_activations: float
    chain_state: float
    images_per_pass: int
    trainable: int
    params: int
    gpu_type: str | None
    checkpointing: bool
    extra: dict[str, float]

    @property
    def steps_part(self) -> float:
        """What a step adds above weights+optimizer: what ``max_memory_allocated - allocated before`` measures."""
        return self.grads + self.unet_activations + self.feature_activations + self.chain_state

    @property
    def allocated(self) -> float:
        return self.weights + self.optimizer + self.ema + self.feature_network + self.steps_part

    @property
    def total(self) -> float:
        """Allocated peak + fragmentation + CUDA context: what the GPU must hold."""
        return self.allocated * FRAGMENTATION + CUDA_CONTEXT_MIB

    def fits(self) -> bool | None:
        if self.gpu_type is None:
            return None
        return self.total <= GPU_MEMORY_MIB[self.gpu_type]

    def lines(self) -> list[str]:
        gib = 1024.0
        parts = (
            f"weights {self.weights / gib:.2f} + grads {self.grads / gib:.2f} + optimizer {self.optimizer / gib:.2f}"
            f" + EMA {self.ema / gib:.2f} + feature net {self.feature_network / gib:.2f}"
            f" + UNet activations {self.unet_activations / gib:.2f}"
            f" ({'checkpointed' if self.checkpointing else 'all T steps'}, {self.images_per_pass} images at once)"
            f" + feature activations {self.feature_activations / gib:.2f} + chain {self.chain_state / gib:.2f} GiB"
        )
        head = (
            f"memory per worker: ~{self.total / gib:.1f} GiB peak (allocator {self.allocated / gib:.1f} GiB"
        )
        head += f" x{FRAGMENTATION:.2f} + CUDA context {CUDA_CONTEXT_MIB / gib:.1f} GiB)"
        out = [
            head,
            "  " + parts,
            f"  trainable parameters {self.trainable / 1e6:.2f}M of {self.params / 1e6:.2f}M",
        ]
        alt = self.extra
        if "other_checkpointing_total" in alt:
            other = "without" if self.checkpointing else "with"
            out.append(
                f"  {other} per-step checkpointing it would be ~{alt['other_checkpointing_total'] / gib:.1f} GiB"
            )
        verdict = self.fits()
        if verdict is not None:
            cap = GPU_MEMORY_MIB[str(self.gpu_type)] / gib
            out.append(
                f"  {self.gpu_type} ({cap:.1f} GiB): "
                + (
                    "fits"
                    if verdict
                    else "DOES NOT FIT: set finetune.micro_batch_size, precision bf16, adapter lora, or sampler.checkpointing"
                )
            )
        return out


def estimate(
    exp: Any,
    *,
    config: dict[str, Any] | None = None,
    probe: UnetProbe | None = None,
    gpu_type: str | None = None,
    checkpointing: bool | None = None,
) -> MemoryEstimate | None:
    """The per-worker estimate for ``exp`` (None when the UNet's config is unknown)."""
    ft = exp.finetune
    cfg = config if config is not None else unet_config(exp)
    if cfg is None:
        return None
    lora = ft.lora if ft.adapter == "lora" else None
    pr = probe if probe is not None else probe_unet(cfg, ft.precision, lora)
    ckpt = exp.sampler.checkpointing if checkpointing is None else checkpointing
    T = exp.sampler.timesteps
    b = ft.micro_batch_size or ft.batch_size
    res = int(cfg["sample_size"] if isinstance(cfg["sample_size"], int) else cfg["sample_size"][0])
    ch = int(cfg.get("in_channels", 3))
    image_mib = ch * res * res * 4 / MiB
    feat = exp.features.train
    feat_key = (
        feat
        if feat in FEATURE_ACT_MIB_PER_IMAGE
        else ("torchvision:mobilenet_v2" if feat.startswith("torchvision:") else feat)
    )
    f_act = FEATURE_ACT_MIB_PER_IMAGE.get(feat_key, math.nan)
    native = FEATURE_NATIVE_SIZE.get(feat_key, 0)
    if native and feat_key != "inception" and exp.features.train_resize:
        f_act *= (exp.features.train_resize / native) ** 2
    f_params = FEATURE_PARAMS_M.get(feat_key, 0.0) * 1e6 * 4 / MiB

    def unet_act(with_ckpt: bool) -> float:
        calls = 1 if with_ckpt else T
        return calls * (pr.const_mib + b * pr.per_image_mib)

    # chain state: the step inputs kept for the checkpointed backward (T x images) + x0, noise
    def chain(with_ckpt: bool) -> float:
        return (T + 3) * b * image_mib + (T * b * image_mib if exp.sampler.eta > 0 else 0.0)

    weights = pr.params * 4 / MiB
    # finetune.train: timesteps trains only the T grid logits (the weights get no gradients, no Adam state and
    # no EMA copy); the chain's activations are saved all the same (the grid's gradient flows through them)
    trainable = T if getattr(ft, "train", "weights") == "timesteps" else pr.trainable
    est = MemoryEstimate(
        weights=weights,
        grads=trainable * 4 / MiB,
        optimizer=2 * trainable * 4 / MiB,
        ema=(trainable * 4 / MiB) if ft.ema_decay is not None else 0.0,
        unet_activations=unet_act(ckpt),
        feature_network=f_params,
        feature_activations=b * (0.0 if math.isnan(f_act) else f_act),
        chain_state=chain(ckpt),
        images_per_pass=b,
        trainable=trainable,
        params=pr.params,
        gpu_type=gpu_type if gpu_type is not None else exp.resources.gpu_type,
        checkpointing=ckpt,
        extra={},
    )
    other = (
        est.allocated - est.unet_activations - est.chain_state + unet_act(not ckpt) + chain(not ckpt)
    ) * FRAGMENTATION
    est.extra["other_checkpointing_total"] = other + CUDA_CONTEXT_MIB
    return est


def dry_run_lines(exp: Any) -> list[str]:
    """What ``--dry-run`` prints about memory (never raises)."""
    try:
        est = estimate(exp)
    except Exception as e:  # noqa: BLE001 - a dry run must not die on the estimate
        return [
            f"memory per worker: estimate unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ]
    if est is None:
        return [
            f"memory per worker: estimate unavailable (no UNet config.json for model.path {exp.model.path!r})"
        ]
    lines = est.lines()
    from mmdsweep.train.precision import check_supported

    where = (
        "cuda"
        if exp.resources.use_gpu
        else ("cpu" if exp.finetune.device in ("auto", "cpu") else exp.finetune.device)
    )
    problem = check_supported(exp.finetune.precision, where)
    if problem:
        lines.insert(0, f"error: {problem}")
    if not exp.resources.use_gpu:
        lines.append(
            "  (resources.use_gpu is false: this is what a GPU worker would need; CPU RAM use is similar)"
        )
    return lines


def write_json(est: MemoryEstimate, path: Path) -> None:  # pragma: no cover - convenience for benchmarks
    d = {k: getattr(est, k) for k in est.__dataclass_fields__}
    d.update(allocated=est.allocated, total=est.total, steps_part=est.steps_part)
    path.write_text(json.dumps(d, indent=2))
