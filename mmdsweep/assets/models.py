"""Denoisers in diffusers format: build, load (local directory or Hugging Face cache), save.

A model directory follows diffusers' layout, either pipeline-style::

    DIR/unet/config.json + DIR/unet/diffusion_pytorch_model.safetensors (or .bin)
    DIR/scheduler/scheduler_config.json

or flat, as in ``google/ddpm-cifar10-32``::

    DIR/config.json + DIR/diffusion_pytorch_model.(safetensors|bin) + DIR/scheduler_config.json

The noise schedule always comes from the checkpoint's scheduler config. Fine-tuned checkpoints
are written pipeline-style with safetensors weights, so the same loader reads them back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from diffusers.utils import logging as diffusers_logging

from mmdsweep.core.dtypes import DTYPES  # noqa: E402,F401  (re-exported)
from mmdsweep.core.sampling import NoiseSchedule  # noqa: E402
from mmdsweep.fsio import atomic_dir, replace_dir  # noqa: E402,F401  (replace_dir re-exported)

# diffusers' advice about `accelerate` and float32 modules is noise for these small, local loads
diffusers_logging.set_verbosity_error()

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class ModelNotFoundError(FileNotFoundError):
    """A model directory or repository that is not on disk; the message says how to get it."""


@dataclass
class Denoiser:
    """A UNet together with the noise schedule it was trained with."""

    unet: UNet2DModel
    schedule: NoiseSchedule
    scheduler_config: dict[str, Any]

    @property
    def resolution(self) -> int:
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)

    def eps_fn(self, unet: torch.nn.Module | None = None) -> Any:
        """``f(x, t) -> model output`` for the samplers (optionally with a wrapped unet)."""
        net = unet if unet is not None else self.unet

        def f(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return net(x, t).sample  # type: ignore[no-any-return]

        return f


def build_unet(
    resolution: int,
    channels: int,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    attention: bool = False,
) -> UNet2DModel:
    """A small diffusers ``UNet2DModel`` for the embedded default (and for tests)."""
    n = len(block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention and n >= 2:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    groups = min(8, min(block_out_channels))
    while any(c % groups for c in block_out_channels):
        groups //= 2
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=groups,
        attention_head_dim=8,
        add_attention=attention,
    )


def scheduler_config_for(
    num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float
) -> dict[str, Any]:
    """A diffusers DDPM scheduler config (epsilon prediction) for a schedule we train ourselves."""
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": beta_schedule,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "prediction_type": "epsilon",
        "clip_sample": False,
        "variance_type": "fixed_small",
        "set_alpha_to_one": True,
    }


def _hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


#: what users should know about Hub models the shipped experiments name (added to "not found" errors)
HUB_NOTES: dict[str, str] = {
    "google/ddpm-cifar10-32": (
        "; note: this repository holds the NON-EMA weights (FID ~12.4 with 1000 steps, not the paper's ~3.2 "
        "EMA model); for paper-comparable runs convert the EMA checkpoint and set model.path (docs/scale.md)"
    ),
    "google/ddpm-ema-church-256": "; this is the EMA model of LSUN-Church 256 used by the MMD-DDM paper",
}


def resolve_model_dir(path: str, revision: str | None = None) -> Path:
    """A local directory, or a hub repository id looked up in the local Hugging Face cache only."""
    p = Path(os.path.expanduser(path))
    if p.exists():
        if not p.is_dir():
            raise ModelNotFoundError(f"model.path: {p} is a file; expected a diffusers model directory")
        return p
    looks_like_repo = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if looks_like_repo:
        cache = _hf_hub_cache()
        repo_dir = cache / ("models--" + path.replace("/", "--"))
        snapshots = repo_dir / "snapshots"
        if snapshots.is_dir():
            ref = revision or "main"
            ref_file = repo_dir / "refs" / ref
            if ref_file.is_file():
                snap = snapshots / ref_file.read_text().strip()
                if snap.is_dir():
                    return snap
            if revision and (snapshots / revision).is_dir():
                return snapshots / revision
            candidates = sorted(snapshots.iterdir(), key=lambda q: q.stat().st_mtime)
            if candidates:
                return candidates[-1]
        note = HUB_NOTES.get(path, "")
        raise ModelNotFoundError(
            f"model.path: {path} is not in the Hugging Face cache ({cache}); nothing is downloaded at run "
            f"time: fetch the UNet config + weights and the scheduler config once on a machine with access, "
            f"with the same HF_HOME: `hf download {path} --include '*.json' 'diffusion_pytorch_model.*'`"
            f" (config.json, scheduler_config.json, diffusion_pytorch_model.safetensors/.bin), "
            f"or point model.path at a local directory{note}"
        )
    raise ModelNotFoundError(f"model.path: {p} does not exist; expected a diffusers model directory")


def _find_component(root: Path, subfolder: str | None, filenames: Sequence[str], what: str) -> Path:
    dirs = [root / subfolder] if subfolder else [root / what, root]
    for d in dirs:
        for name in filenames:
            if (d / name).is_file():
                return d
    tried = ", ".join(str(d / filenames[0]) for d in dirs)
    raise ModelNotFoundError(f"model.path: no {what} found in {root} (looked for {tried})")


def load_denoiser(
    path: str,
    *,
    unet_subfolder: str | None = None,
    scheduler_subfolder: str | None = None,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Denoiser:
    """Load a diffusers ``UNet2DModel`` and its scheduler config from disk (never downloads)."""
    root = resolve_model_dir(path, revision)
    unet_dir = _find_component(root, unet_subfolder, ("config.json",), "unet")
    if not any((unet_dir / w).is_file() for w in WEIGHT_NAMES):
        raise ModelNotFoundError(f"model.path: {unet_dir} has config.json but no {' or '.join(WEIGHT_NAMES)}")
    sched_dir = _find_component(root, scheduler_subfolder, ("scheduler_config.json",), "scheduler")
    unet = UNet2DModel.from_pretrained(unet_dir, torch_dtype=dtype, local_files_only=True)
    sched_cfg = json.loads((sched_dir / "scheduler_config.json").read_text())
    return Denoiser(
        unet=unet, schedule=NoiseSchedule.from_scheduler_config(sched_cfg), scheduler_config=sched_cfg
    )


def check_model_path(path: str, unet_subfolder: str | None = None, revision: str | None = None) -> Path:
    """Cheap existence check for ``--dry-run``: the UNet config and weights are on disk."""
    root = resolve_model_dir(path, revision)
    unet_dir = _find_component(root, unet_subfolder, ("config.json",), "unet")
    if not any((unet_dir / w).is_file() for w in WEIGHT_NAMES):
        raise ModelNotFoundError(f"model.path: {unet_dir} has config.json but no {' or '.join(WEIGHT_NAMES)}")
    _find_component(root, None, ("scheduler_config.json",), "scheduler")
    return root


def save_denoiser(
    directory: str | os.PathLike[str], unet: torch.nn.Module, scheduler_config: dict[str, Any]
) -> Path:
    """Write ``unet/`` (safetensors) and ``scheduler/scheduler_config.json`` atomically.

    The directory is assembled under a temporary name and renamed into place, so a crash never
    leaves a half-written model where a complete one was.
    """
    final = Path(directory)
    assert isinstance(unet, UNet2DModel)
    with atomic_dir(final) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    return final


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
