"""Export a fine-tuned checkpoint as a plain diffusers ``DDIMPipeline`` directory.

The exported directory loads with ``diffusers.DDIMPipeline.from_pretrained(dir)``; its DDIM
scheduler reproduces mmdsweep's schedule exactly (trained betas, "leading" spacing with
``steps_offset=0``, ``set_alpha_to_one``), so ``pipe(num_inference_steps=T, eta=0.0)`` gives
the same T-step chain that was fine-tuned. The intended T (and sampler settings) are recorded in
``mmdsweep.json`` beside ``model_index.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mmdsweep.assets.adapters import merge_adapter_if_any
from mmdsweep.assets.models import load_denoiser, replace_dir


def export_pipeline(
    checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, timesteps: int | None = None
) -> Path:
    """Write ``out_dir`` as a diffusers DDIMPipeline built from a checkpoint (or model) directory."""
    from diffusers import DDIMPipeline, DDIMScheduler

    ckpt = Path(checkpoint)
    state: dict[str, Any] = {}
    if (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
    T = timesteps if timesteps is not None else state.get("timesteps")
    if T is None:
        raise ValueError(f"{ckpt}: no state.json with 'timesteps'; pass timesteps explicitly")
    spacing = state.get("spacing", "uniform")
    if spacing != "uniform":
        raise ValueError(
            f"{ckpt}: fine-tuned with {spacing!r} timestep spacing, which diffusers' DDIMScheduler cannot express; "
            "only 'uniform' (leading) spacing can be exported as a DDIMPipeline"
        )
    if state.get("sampler", "ddim") != "ddim":
        # the weights still work with DDIM, but they were tuned for another solver: say so in the metadata
        pass
    den = merge_adapter_if_any(ckpt) or load_denoiser(str(ckpt))  # LoRA checkpoints: merged weights
    sched_cfg = den.schedule.to_scheduler_config()
    scheduler = DDIMScheduler.from_config(sched_cfg)
    pipe = DDIMPipeline(unet=den.unet, scheduler=scheduler)
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        meta = {
            "num_inference_steps": int(T),
            "eta": float(state.get("eta", 0.0)),
            "sampler": state.get("sampler", "ddim"),
            "spacing": spacing,
            "source_checkpoint": str(ckpt.resolve()),
            "usage": f"DDIMPipeline.from_pretrained(dir)(num_inference_steps={int(T)}, eta=0.0)",
        }
        for key in ("best_fid", "best_step", "step"):
            if key in state:
                meta[key] = state[key]
        (tmp / "mmdsweep.json").write_text(json.dumps(meta, indent=2, default=float))
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
