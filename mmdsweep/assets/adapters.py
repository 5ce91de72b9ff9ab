"""LoRA checkpoints on disk: merge a checkpoint's adapter into plain diffusers weights.

Lives in ``assets`` (not ``train``) because export and evaluation, which sit below training in
the package layering, read checkpoints too. The training-side helpers (wrapping a UNet with peft,
saving and loading the adapter) are in :mod:`mmdsweep.train.adapters`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mmdsweep.assets.models import Denoiser, load_denoiser
from mmdsweep.core.sampling import NoiseSchedule

ADAPTER_DIR = "adapter"
BASE_MODEL_KEY = "base_model"


def merge_adapter_if_any(checkpoint: str | os.PathLike[str]) -> Denoiser | None:
    """The checkpoint's denoiser with its LoRA adapter merged, or None when it holds full weights.

    The base model is the directory recorded under ``base_model`` in the checkpoint's
    ``state.json``; the scheduler config is the checkpoint's own.
    """
    ckpt = Path(checkpoint)
    if not (ckpt / ADAPTER_DIR / "adapter_config.json").is_file():
        return None
    from peft import PeftModel

    state = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").is_file() else {}
    base = state.get(BASE_MODEL_KEY)
    if not base:
        raise ValueError(f"{ckpt}: a LoRA checkpoint without '{BASE_MODEL_KEY}' in state.json")
    den = load_denoiser(str(base))
    model = PeftModel.from_pretrained(den.unet, str(ckpt / ADAPTER_DIR))  # type: ignore[arg-type]
    unet = model.merge_and_unload()
    sched_file = ckpt / "scheduler" / "scheduler_config.json"
    sched_cfg = json.loads(sched_file.read_text()) if sched_file.is_file() else den.scheduler_config
    return Denoiser(
        unet=unet,  # type: ignore[arg-type]
        schedule=NoiseSchedule.from_scheduler_config(sched_cfg),
        scheduler_config=sched_cfg,
    )
