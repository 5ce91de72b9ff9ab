"""Pretraining for the embedded default: a small DDPM and a domain classifier.

``python -m mmdsweep.pretrain experiments/digits.yaml`` trains, on the experiment's data (the
embedded default is scikit-learn's handwritten digits upsampled to 16x16):

* a DDPM (diffusers ``UNet2DModel``, epsilon prediction, Ho et al. 2020 eq. 14, EMA weights),
  the "pretrained model" that MMD-DDM then fine-tunes for few-step sampling;
* a small classifier whose penultimate layer serves as a domain feature space and, by default,
  as the evaluation network for FID/KID.

Both are deterministic for a seed and cached under ``pretrain.cache_dir`` by a hash of the
configuration that affects them, so a second call costs nothing.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F

from mmdsweep.assets import classifier as clf
from mmdsweep.assets import components as comp
from mmdsweep.assets import data as data_mod
from mmdsweep.assets.models import build_unet, load_denoiser, save_denoiser, scheduler_config_for
from mmdsweep.assets.pretrained import (  # noqa: F401  (re-exported: the cache lookup lives in assets)
    PRETRAIN_VERSION,
    PretrainArtifacts,
    cached,
    pretrain_dir,
    pretrain_key,
)
from mmdsweep.config import ConfigError, Experiment, load_experiment
from mmdsweep.core.sampling import NoiseSchedule, sample, select_timesteps
from mmdsweep.fsio import atomic_dir
from mmdsweep.utils import progress, save_grid


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train_ddpm(
    images: torch.Tensor,
    exp: Experiment,
    *,
    show_progress: bool = True,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train a DDPM with the simple loss ||eps - eps_theta(sqrt(a) x0 + sqrt(1-a) eps, t)||^2.

    Returns the EMA model (Ho et al. 2020 use EMA weights for sampling) and the scheduler config.
    """
    cfg = exp.pretrain
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    unet = build_unet(
        images.shape[-1], images.shape[1], cfg.block_out_channels, cfg.layers_per_block, cfg.attention
    )
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched_cfg = scheduler_config_for(cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end)
    schedule = NoiseSchedule.from_scheduler_config(sched_cfg)
    abar = schedule.alphas_cumprod.to(torch.float32)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    n = images.shape[0]
    bar = progress(range(cfg.steps), desc="pretrain ddpm", enabled=show_progress)
    losses: list[float] = []
    for step in bar:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        x0 = images[idx]
        # random horizontal flips are wrong for digits; use small random translations instead
        t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.steps, cfg.lr, cfg.lr_warmup)
        loss = F.mse_loss(unet(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if show_progress and step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")  # type: ignore[attr-defined]
    info = {"final_loss": sum(losses[-100:]) / len(losses[-100:]), "steps": cfg.steps}
    return ema, {"scheduler_config": sched_cfg, **info}


def run_pretrain(exp: Experiment, *, force: bool = False, show_progress: bool = True) -> PretrainArtifacts:
    """Train (or fetch from the cache) the DDPM and classifier of ``exp``."""
    if not force:
        hit = cached(exp)
        if hit is not None:
            return hit
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(exp.pretrain.threads)
    try:
        return _pretrain(exp, show_progress=show_progress)
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(exp: Experiment, *, show_progress: bool) -> PretrainArtifacts:
    t0 = time.time()
    ds = comp.real_dataset(exp)
    images, labels = data_mod.load_tensor(ds)
    ema, info = train_ddpm(images, exp, show_progress=show_progress)
    t_ddpm = time.time() - t0

    with atomic_dir(pretrain_dir(exp)) as tmp:
        save_denoiser(tmp / "model", ema, info["scheduler_config"])
        # classifier: trained on the labelled split, accuracy measured on held-out data
        t1 = time.time()
        acc = float("nan")
        if bool((labels >= 0).all()):
            classifier = clf.train_classifier(
                images, labels, steps=exp.pretrain.classifier_steps, seed=exp.pretrain.seed
            )
            if exp.data.dataset == "digits" and exp.data.split == "train":
                # the held-out part of the same seeded split the DDPM was trained on (disjoint from it)
                xt, yt = data_mod.load_tensor(comp.heldout_dataset(exp))
                acc = clf.accuracy(classifier, xt, yt)
            clf.save_classifier(classifier, tmp / "classifier.safetensors")
        t_clf = time.time() - t1
        # a grid of 50-step DDIM samples as a visual check
        den = load_denoiser(str(tmp / "model"))
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn((64, images.shape[1], images.shape[2], images.shape[3]), generator=gen)
        with torch.no_grad():
            x = sample(
                den.eps_fn(),
                noise,
                den.schedule,
                select_timesteps(50, den.schedule.num_train_timesteps),
                sampler="ddim",
            )
        save_grid(x, tmp / "samples_ddim50.png", nrow=8)
        meta = {
            "key": pretrain_key(exp),
            "ddpm_final_loss": info["final_loss"],
            "ddpm_steps": info["steps"],
            "ddpm_seconds": round(t_ddpm, 1),
            "classifier_test_accuracy": acc,
            "classifier_seconds": round(t_clf, 1),
            "num_images": int(images.shape[0]),
            "resolution": int(images.shape[-1]),
            "channels": int(images.shape[1]),
            "config": {"pretrain": asdict(exp.pretrain), "data": asdict(exp.data)},
        }
        (tmp / "info.json").write_text(json.dumps(meta, indent=2))
    hit = cached(exp)
    assert hit is not None
    return hit


def resolve_model_source(exp: Experiment) -> comp.ModelSource:
    """The pretrained model of ``exp``, training the embedded default's DDPM first if it is not cached.

    The asset layer's :func:`mmdsweep.assets.components.resolve_model_source` only looks things up;
    callers that may train go through this function.
    """
    if exp.model.source == "pretrain" and cached(exp) is None:
        run_pretrain(exp)
    return comp.resolve_model_source(exp)


def main(argv: list[str] | None = None) -> int:
    from mmdsweep.cli_args import pretrain_parser

    args = pretrain_parser().parse_args(argv)
    from mmdsweep.config import parse_override

    try:
        exp = load_experiment(args.experiment, dict(parse_override(s) for s in args.set))
        if exp.model.source != "pretrain":
            raise ConfigError(
                f"{exp.source}: model.source: is {exp.model.source!r}; pretraining needs 'pretrain'"
            )
        data_mod.check_dataset(exp.data.dataset, exp.data.root)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"{exp.source}: ok; pretrain cache: {pretrain_dir(exp)}")
        return 0
    t0 = time.time()
    hit = None if args.force else cached(exp)
    art = hit or run_pretrain(exp, force=args.force)
    state = "cached" if hit else f"trained in {time.time() - t0:.0f} s"
    print(f"pretrained model ({state}): {art.model_dir}")
    print(f"classifier: {art.classifier_path} (test accuracy {art.info.get('classifier_test_accuracy')})")
    print(f"50-step DDIM samples: {art.grid_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
