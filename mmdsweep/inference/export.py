"""Export a fine-tuned checkpoint as a plain diffusers pipeline that reproduces its chain, or refuse.

The chain (sampler, grid, clipping, final clamp; :class:`~mmdsweep.core.sampling.ChainSpec`) recorded in the
checkpoint's ``state.json`` decides the scheduler:

* ``ddim`` on a grid whose steps diffusers' ``DDIMScheduler`` takes (``leading``; ``trailing``/``linspace`` when
  each step is ``N // T``): a ``DDIMPipeline`` with that ``timestep_spacing``, ``steps_offset=0`` and our
  clipping; ``pipe(num_inference_steps=T, eta=...)``.
* ``ddim`` with eta = 0 on any other grid (``linspace``, ``quadratic``, a learned grid): diffusers' DDIM cannot
  take it (its step goes to ``t - N // T``), but first-order DPM-Solver++ is DDIM with eta = 0: a
  ``DDPMPipeline`` holding a ``DPMSolverMultistepScheduler(solver_order=1)``, driven with
  ``scheduler.set_timesteps(timesteps=[...])`` (the grid is in ``mmdsweep.json``).  Needs no clipping
  (DPM-Solver's thresholding clips in a different place than DDIM) and ``set_alpha_to_one``.
* ``dpmpp_2m`` / ``dpmpp_3m``: ``DPMSolverMultistepScheduler`` (dpmsolver++, midpoint, lower_order_final,
  final_sigmas_type zero, ``thresholding=True, sample_max_value=1`` for ``clip_sample`` with range 1), its own
  ``timestep_spacing`` or custom ``timesteps``.
* ``unipc``: ``UniPCMultistepScheduler`` (bh2, order 2) with its ``timestep_spacing`` (it takes no custom grid).

Anything else is refused with a one-line ``ValueError`` naming what cannot be reproduced.  ``mmdsweep.json``
records the chain and how to run it; ``tests/test_chain.py`` checks the exported pipeline reproduces our
images (<= 1e-5) for each sampler.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mmdsweep.assets.adapters import merge_adapter_if_any
from mmdsweep.assets.models import load_denoiser
from mmdsweep.core.sampling import ChainSpec, NoiseSchedule, select_timesteps
from mmdsweep.fsio import atomic_dir

__all__ = ["export_pipeline", "scheduler_for_chain"]


def _base_config(schedule: NoiseSchedule) -> dict[str, Any]:
    cfg = schedule.to_scheduler_config()
    for key in ("clip_sample", "clip_sample_range", "timestep_spacing", "steps_offset", "thresholding"):
        cfg.pop(key, None)
    return cfg


def scheduler_for_chain(schedule: NoiseSchedule, chain: ChainSpec) -> tuple[Any, list[int] | None, str]:
    """``(diffusers scheduler, custom timesteps or None, pipeline class name)`` reproducing ``chain``; raises a
    one-line ``ValueError`` when diffusers cannot reproduce it."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    n = schedule.num_train_timesteps
    grid = chain.timestep_grid(n)
    T = len(grid)
    base = _base_config(schedule)
    named = None
    if chain.grid is None and chain.spacing in ("leading", "trailing", "linspace"):
        named = chain.spacing
    where = f"sampler {chain.sampler!r}, spacing {chain.spacing!r}, T={T}"
    if chain.sampler == "ddim":
        stride_ok = all(a - b == n // T for a, b in zip(grid, grid[1:])) and grid[-1] - n // T < 0
        if named is not None and stride_ok and select_timesteps(T, n, named, "ddim") == grid:
            sched = DDIMScheduler.from_config(
                {
                    **base,
                    "timestep_spacing": named,
                    "steps_offset": 0,
                    "clip_sample": chain.clip_sample,
                    "clip_sample_range": chain.clip_sample_range,
                }
            )
            return sched, None, "DDIMPipeline"
        if chain.eta > 0:
            raise ValueError(
                f"export: {where} with eta={chain.eta}: diffusers' DDIM steps to t - N//T and cannot follow this "
                "grid, and first-order DPM-Solver++ equals DDIM only for eta=0"
            )
        if chain.clip_sample:
            raise ValueError(
                f"export: {where} with clip_sample: diffusers' DDIM cannot follow this grid and DPM-Solver's "
                "thresholding clips where DDIM does not; fine-tune with timestep_spacing leading to export"
            )
        if schedule.final_alpha_cumprod != 1.0:
            raise ValueError(
                f"export: {where}: needs set_alpha_to_one to be expressed as first-order DPM-Solver++"
            )
        sched = DPMSolverMultistepScheduler.from_config(
            {
                **base,
                "solver_order": 1,
                "algorithm_type": "dpmsolver++",
                "final_sigmas_type": "zero",
                "lower_order_final": True,
            }
        )
        return sched, grid, "DDPMPipeline"
    if chain.clip_sample and chain.clip_sample_range != 1.0:
        raise ValueError(
            f"export: {where} with clip_sample_range={chain.clip_sample_range}: diffusers' thresholding equals "
            "static clipping only for range 1"
        )
    thresh = {"thresholding": bool(chain.clip_sample), "sample_max_value": 1.0}
    multistep_grid_ok = named is not None and select_timesteps(T, n, named, chain.sampler) == grid
    if chain.sampler in ("dpmpp_2m", "dpmpp_3m"):
        cfg = {
            **base,
            **thresh,
            "solver_order": 2 if chain.sampler == "dpmpp_2m" else 3,
            "algorithm_type": "dpmsolver++",
            "solver_type": "midpoint",
            "lower_order_final": True,
            "final_sigmas_type": "zero",
            "steps_offset": 0,
        }
        if multistep_grid_ok:
            return (
                DPMSolverMultistepScheduler.from_config({**cfg, "timestep_spacing": named}),
                None,
                "DDPMPipeline",
            )
        return DPMSolverMultistepScheduler.from_config(cfg), grid, "DDPMPipeline"
    if chain.sampler == "unipc":
        if not multistep_grid_ok:
            raise ValueError(
                f"export: {where}: diffusers' UniPCMultistepScheduler takes no custom timesteps; use "
                "timestep_spacing leading, trailing or linspace"
            )
        cfg = {
            **base,
            **thresh,
            "solver_order": 2,
            "solver_type": "bh2",
            "predict_x0": True,
            "lower_order_final": True,
            "final_sigmas_type": "zero",
            "timestep_spacing": named,
            "steps_offset": 0,
        }
        return UniPCMultistepScheduler.from_config(cfg), None, "DDPMPipeline"
    raise ValueError(f"export: sampler {chain.sampler!r} has no diffusers equivalent")


def export_pipeline(
    checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, timesteps: int | None = None
) -> Path:
    """Write ``out_dir`` as a diffusers pipeline reproducing the checkpoint's chain (or raise ValueError)."""
    import dataclasses

    from diffusers import DDIMPipeline, DDPMPipeline

    from mmdsweep.inference.generate import chain_from_state

    ckpt = Path(checkpoint)
    state: dict[str, Any] = {}
    if (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
    den = merge_adapter_if_any(ckpt) or load_denoiser(str(ckpt))  # LoRA checkpoints: merged weights
    chain = chain_from_state(state, den.scheduler_config)
    if chain is None:
        if timesteps is None:
            raise ValueError(f"{ckpt}: no state.json with 'timesteps'; pass timesteps explicitly")
        chain = chain_from_state({"timesteps": timesteps}, den.scheduler_config)
        assert chain is not None
    elif timesteps is not None and int(timesteps) != chain.timesteps:
        chain = dataclasses.replace(chain, timesteps=int(timesteps), grid=None)
    scheduler, custom, pipe_name = scheduler_for_chain(den.schedule, chain)
    pipe = (
        DDIMPipeline(unet=den.unet, scheduler=scheduler)
        if pipe_name == "DDIMPipeline"
        else DDPMPipeline(unet=den.unet, scheduler=scheduler)
    )
    T = chain.timesteps
    grid = chain.timestep_grid(den.schedule.num_train_timesteps)
    if custom is None:
        usage = f"{pipe_name}.from_pretrained(dir)(num_inference_steps={T}" + (
            f", eta={chain.eta})" if pipe_name == "DDIMPipeline" else ")"
        )
    else:
        usage = (
            f"pipe = {pipe_name}.from_pretrained(dir); pipe.scheduler.set_timesteps(timesteps={custom}); "
            "then x = unet(x, t).sample -> scheduler.step(...).prev_sample for t in pipe.scheduler.timesteps "
            "(DDPMPipeline.__call__ would reset the grid from num_inference_steps)"
        )
    final = Path(out_dir)
    with atomic_dir(final) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        meta: dict[str, Any] = {
            "num_inference_steps": int(T),
            "timesteps_grid": grid,
            "custom_timesteps": custom,
            "eta": chain.eta,
            "sampler": chain.sampler,
            "spacing": chain.spacing,
            "chain": chain.to_dict(),
            "pipeline": pipe_name,
            "scheduler": type(scheduler).__name__,
            "final_clamp_note": "diffusers pipelines clamp the output image to [0, 1] (= x0 clamped to [-1, 1])",
            "source_checkpoint": str(ckpt.resolve()),
            "usage": usage,
        }
        for key in ("best_fid", "best_step", "step"):
            if key in state:
                meta[key] = state[key]
        (tmp / "mmdsweep.json").write_text(json.dumps(meta, indent=2, default=float))
    return final
