"""Sample images from a fine-tuning checkpoint or an exported pipeline.

::

    python -m mmdsweep.sample CHECKPOINT_OR_PIPELINE --timesteps 5 --num 64 --out grid.png
    python -m mmdsweep.sample results/sweep/exported/T5 --num 50000 --out samples.npz
    python -m mmdsweep.sample results/sweep/exported/T5 --num 50000 --out samples/

The output kind follows ``--out``:

* ``*.png`` / ``*.jpg``: one image grid;
* ``*.npz``: every image in one uint8 array ``arr_0`` of shape ``(N, H, W, 3)`` (NHWC, RGB;
  grayscale models are repeated to three channels), the layout of OpenAI's guided-diffusion
  FID evaluator and the many tools that copied it;
* a directory (a path ending in ``/``, an existing directory or a path without a suffix):
  one PNG per image, ``000000.png``, ``000001.png``, ... as clean-fid's ``compute_fid(dir, ...)``
  and torch-fidelity read them.

Sample ``i`` starts from the same noise as sample ``i`` of the sweep's evaluation
(``mmdsweep.inference.evaluation.eval_noise``), so images do not depend on ``--batch-size`` and two
models sampled with the same ``--seed`` are compared on identical noise. With ``--eta > 0``
the per-step DDIM noise is drawn per sample as well.

``--timesteps``, ``--sampler``, ``--spacing`` and ``--eta`` default to the values recorded with
the model: a fine-tuning checkpoint's ``state.json``, or an exported pipeline's ``mmdsweep.json``
(``num_inference_steps``, written by ``mmdsweep.inference.export``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict, cast

import numpy as np
import torch

from mmdsweep.core.noise import initial_noise, step_noise
from mmdsweep.core.sampling import ChainSpec, NoiseSchedule, run_chain
from mmdsweep.utils import atomic_write_bytes, progress, resolve_device, save_grid, to_uint8

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from mmdsweep.assets.models import Denoiser
    from mmdsweep.config import Experiment

STATE_FILE = "state.json"
EXPORT_META_FILE = "mmdsweep.json"
GRID_SUFFIXES = (".png", ".jpg", ".jpeg")
EVAL_ROLE = "eval"


def eval_noise(n: int, shape: Sequence[int], seed: int, start: int = 0) -> torch.Tensor:
    """Initial noise of evaluation samples ``start .. start+n-1`` (role ``eval``, :mod:`mmdsweep.core.noise`)."""
    return initial_noise(shape, seed=seed, role=EVAL_ROLE, start=start, count=n)


def sample_noise(start: int, stop: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """Initial noise of samples ``start..stop-1``: rows ``start:stop`` of ``eval_noise(stop, shape, seed)``."""
    return eval_noise(stop - start, shape, seed, start=start)


def chain_from_experiment(exp: Experiment, scheduler_config: dict[str, Any] | None) -> ChainSpec:
    """The experiment's chain, with ``sampler.clip_sample: null`` resolved from the model's scheduler config."""
    sc = exp.sampler
    spacing = getattr(sc, "timestep_spacing", None)
    if spacing is None and getattr(sc, "spacing", None) is not None:
        spacing = "leading" if sc.spacing == "uniform" else sc.spacing
    return ChainSpec.resolve(
        sampler=sc.name,
        timesteps=sc.timesteps,
        spacing=spacing,
        eta=sc.eta,
        clip_sample=sc.clip_sample,
        clip_sample_range=getattr(sc, "clip_sample_range", 1.0),
        final_clamp=getattr(sc, "final_clamp", True),
        scheduler_config=scheduler_config,
    )


def chain_from_state(state: dict[str, Any], scheduler_config: dict[str, Any] | None) -> ChainSpec | None:
    """The chain recorded with a model (``state.json`` / ``mmdsweep.json``), or ``None`` if none is."""
    if isinstance(state.get("chain"), dict):
        return ChainSpec.from_dict(state["chain"])
    if "timesteps" not in state:
        return None
    return plain_chain(  # checkpoints written before the chain was recorded
        state.get("sampler") or "ddim",
        int(state["timesteps"]),
        state.get("spacing"),
        float(state.get("eta") or 0.0),
        scheduler_config,
    )


def plain_chain(
    sampler: str, timesteps: int, spacing: str | None, eta: float, scheduler_config: dict[str, Any] | None
) -> ChainSpec:
    """A chain from its sampler settings alone: clipping as the model's scheduler config says, final clamp on."""
    return ChainSpec.resolve(
        sampler=sampler,
        timesteps=timesteps,
        spacing=spacing,
        eta=eta,
        clip_sample=None,
        clip_sample_range=None,
        final_clamp=True,
        scheduler_config=scheduler_config,
    )


@torch.no_grad()
def generate(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    chain: ChainSpec,
    *,
    num: int,
    shape: Sequence[int],
    seed: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
    show_progress: bool = False,
    key: int = 0,
) -> tuple[torch.Tensor | None, float]:
    """THE generation loop (evaluation, ``mmdsweep.sample``, speed and export checks all use it).

    Sample ``i`` starts from the per-sample noise of (seed, ``eval``, key, i) and, with ``eta > 0``, takes its
    per-step noise from the same key, so images do not depend on ``batch_size``.  Runs
    :func:`~mmdsweep.core.sampling.run_chain` (grid, clipping and final clamp of ``chain``).  Returns
    ``(images (num, C, H, W) float32 on the CPU or None when on_batch(start, images) took them, seconds per
    image of chain time)``.
    """
    if num < 1 or batch_size < 1:
        raise ValueError(f"num={num} and batch_size={batch_size} must be >= 1")
    starts = range(0, num, batch_size)
    bar = progress(starts, desc=f"sampling T={chain.timesteps}", enabled=show_progress, total=len(starts))
    kept: list[torch.Tensor] = []
    elapsed = 0.0
    for start in bar:
        count = min(batch_size, num - start)
        z = initial_noise(shape, seed=seed, role=EVAL_ROLE, start=start, count=count, key=key)
        noise = None
        if chain.eta > 0:
            noise = step_noise(
                shape, chain.timesteps, seed=seed, role=EVAL_ROLE, start=start, count=count, key=key
            ).to(device=device, dtype=dtype)
        z = z.to(device=device, dtype=dtype)
        t0 = time.perf_counter()
        x = run_chain(eps_fn, z, schedule, chain, step_noise=noise)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - t0
        x = x.float().cpu()
        if on_batch is not None:
            on_batch(start, x)
        else:
            kept.append(x)
    if hasattr(bar, "close"):
        bar.close()
    return (torch.cat(kept) if on_batch is None else None), elapsed / num


def load_model(model: str | os.PathLike[str] | Denoiser) -> Denoiser:
    """A :class:`~mmdsweep.assets.models.Denoiser` from a directory (or the object itself).

    A LoRA checkpoint (``adapter/`` + ``state.json`` naming its base model) is loaded with the adapter merged
    into the base weights (:func:`mmdsweep.assets.adapters.merge_adapter_if_any`), so sampling, evaluation
    and the final protocol see the fine-tuned chain, as the export does."""
    from mmdsweep.assets.adapters import merge_adapter_if_any
    from mmdsweep.assets.models import Denoiser, load_denoiser

    if isinstance(model, Denoiser):
        return model
    return merge_adapter_if_any(model) or load_denoiser(str(model))


class SamplingModel(NamedTuple):
    """A model made ready for sampling by :func:`prepare_model`: the denoiser, ``eps(x, t)`` of its
    UNet (on ``device``, in eval mode), the device and the ``(C, H, W)`` shape of one image."""

    den: Denoiser
    eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device
    shape: tuple[int, int, int]


def prepare_model(
    model: str | os.PathLike[str] | Denoiser,
    device: str | torch.device,
    dtype: torch.dtype | None = None,
) -> SamplingModel:
    """Resolve ``device`` (``"auto"``, ``"cpu"``, ``"cuda:N"`` or a ``torch.device``), load ``model``
    and move its UNet there (and to ``dtype``, if given) in eval mode. A
    :class:`~mmdsweep.assets.models.Denoiser` passed in is moved in place."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    den = load_model(model)
    unet = cast(torch.nn.Module, den.unet).to(device=dev, dtype=dtype).eval()
    return SamplingModel(den, den.eps_fn(unet), dev, (den.channels, den.resolution, den.resolution))


def read_state(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Sampler settings recorded with a model directory (``{}`` when there are none).

    A checkpoint's ``state.json`` (``timesteps``, ``sampler``, ``spacing``, ``eta``), else an
    exported pipeline's ``mmdsweep.json`` (``num_inference_steps`` is returned as ``timesteps``).
    """
    for name in (STATE_FILE, EXPORT_META_FILE):
        path = Path(model_dir) / name
        if path.is_file():
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                return {}
            if "timesteps" not in data and "num_inference_steps" in data:
                data["timesteps"] = data["num_inference_steps"]
            return data
    return {}


def resolve_chain(
    den: Denoiser,
    timesteps: int | None,
    *,
    sampler: str | None = None,
    spacing: str | None = None,
    eta: float | None = None,
    state: dict[str, Any] | None = None,
    chain: ChainSpec | None = None,
) -> ChainSpec:
    """The chain to sample with: ``chain`` if given, else the one recorded in ``state`` with any explicit
    argument overriding it, else a new chain from the arguments (``clip_sample`` from the model's config)."""
    import dataclasses

    if chain is not None:
        return chain
    recorded = chain_from_state(state or {}, den.scheduler_config)
    if recorded is not None:
        changes: dict[str, Any] = {}
        if timesteps is not None and int(timesteps) != recorded.timesteps:
            changes.update(timesteps=int(timesteps), grid=None)
        if sampler is not None and sampler != recorded.sampler:
            changes.update(sampler=sampler, grid=None)
            if spacing is None:
                changes["spacing"] = None
        if spacing is not None:
            changes.update(spacing=spacing, grid=None)
        if eta is not None:
            changes["eta"] = float(eta)
        if not changes:
            return recorded
        if changes.get("spacing", "x") is None:
            from mmdsweep.core.sampling import normalize_spacing

            changes["spacing"] = normalize_spacing(None, changes.get("sampler", recorded.sampler))
        return dataclasses.replace(recorded, **changes)
    if timesteps is None:
        raise ValueError("timesteps: required (the model records no chain)")
    return plain_chain(sampler or "ddim", int(timesteps), spacing, float(eta or 0.0), den.scheduler_config)


DEFAULT_NUM = 64
"""Images per call of :func:`generate_images` / :func:`write_samples` unless ``num`` is given."""


class SampleOptions(TypedDict, total=False):
    """The keywords :func:`write_samples` hands on to :func:`generate_images` (defaults there)."""

    num: int
    seed: int
    sampler: str | None
    spacing: str | None
    eta: float | None
    batch_size: int
    device: str | torch.device
    show_progress: bool
    chain: ChainSpec | None


def generate_images(
    model: str | os.PathLike[str] | Denoiser,
    timesteps: int | None = None,
    *,
    num: int = DEFAULT_NUM,
    seed: int = 0,
    sampler: str | None = None,
    spacing: str | None = None,
    eta: float | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
    show_progress: bool = False,
    chain: ChainSpec | None = None,
) -> torch.Tensor | None:
    """``num`` images in [-1, 1] (``final_clamp``), shape ``(num, C, H, W)`` on the CPU.

    The chain is ``chain``, else the one recorded with ``model`` (a directory's ``state.json`` or
    ``mmdsweep.json``) overridden by the explicit arguments, else built from them.  Sample ``i`` starts from
    ``eval_noise(num, shape, seed)[i]``, whatever the batch size: the evaluator's images for the same seed.
    With ``on_batch(start, images)`` the images are handed over batch by batch and not kept (returns ``None``).
    """
    state = read_state(model) if isinstance(model, (str, os.PathLike)) else {}
    den, eps, dev, shape = prepare_model(model, device)
    spec = resolve_chain(den, timesteps, sampler=sampler, spacing=spacing, eta=eta, state=state, chain=chain)
    images, _ = generate(
        eps,
        den.schedule,
        spec,
        num=num,
        shape=shape,
        seed=seed,
        batch_size=batch_size,
        device=dev,
        on_batch=on_batch,
        show_progress=show_progress,
    )
    return images


def output_kind(out: str | os.PathLike[str]) -> str:
    """``"grid"``, ``"npz"`` or ``"dir"`` for an ``--out`` path (see the module docstring)."""
    text = str(out)
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir():
        return "dir"
    suffix = path.suffix.lower()
    if suffix in GRID_SUFFIXES:
        return "grid"
    if suffix == ".npz":
        return "npz"
    if suffix == "":
        return "dir"
    raise ValueError(f"--out {text}: unknown output kind {suffix!r}; use .png, .jpg, .npz or a directory")


def _rgb_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (N, C, H, W) -> uint8 (N, H, W, 3)."""
    arr = to_uint8(x)
    return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr


def save_npz(images: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write uint8 NHWC ``images`` as ``arr_0`` of an ``.npz`` file (atomically)."""
    import io

    buf = io.BytesIO()
    np.savez(buf, arr_0=images)
    out = Path(path)
    atomic_write_bytes(out, buf.getvalue())
    return out


def save_png(image: np.ndarray, path: Path) -> None:
    """One uint8 HWC image as PNG (grayscale as mode ``L``)."""
    from PIL import Image

    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, format="PNG")


def write_samples(
    model: str | os.PathLike[str] | Denoiser,
    out: str | os.PathLike[str],
    timesteps: int | None = None,
    *,
    grid_scale: int = 1,
    **options: Unpack[SampleOptions],
) -> Path:
    """Sample ``num`` images and write them to ``out`` as a grid, an ``.npz`` or a PNG directory.

    ``options`` are :func:`generate_images`'s keywords (``num``, ``seed``, ``sampler``, ...), passed on as given.
    """
    kind = output_kind(out)
    num = options.get("num", DEFAULT_NUM)
    if kind == "dir":
        directory = Path(out)
        directory.mkdir(parents=True, exist_ok=True)
        width = max(6, len(str(num - 1)))

        def write_batch(start: int, x: torch.Tensor) -> None:
            for j, img in enumerate(to_uint8(x)):
                save_png(img, directory / f"{start + j:0{width}d}.png")

        generate_images(model, timesteps, on_batch=write_batch, **options)
        return directory
    images = generate_images(model, timesteps, **options)
    assert images is not None
    if kind == "npz":
        return save_npz(_rgb_uint8(images), out)
    nrow = max(1, math.ceil(math.sqrt(num)))
    return save_grid(images, out, nrow=nrow, scale=grid_scale)


def _parser() -> argparse.ArgumentParser:
    from mmdsweep.cli_args import sample_parser

    return sample_parser()


def fail(message: str) -> int:
    """A command line error: ``error: MESSAGE`` on stderr; returns the exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def quiet_diffusers() -> None:
    """Silence diffusers' loading chatter (e.g. the ``accelerate`` hint) in the command line tools."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from mmdsweep.assets.models import ModelNotFoundError

    model_dir = Path(os.path.expanduser(args.model))
    if not model_dir.exists():
        return fail(f"{args.model} does not exist; expected a checkpoint or exported pipeline directory")
    if not model_dir.is_dir():
        return fail(f"{args.model} is a file; expected a checkpoint or exported pipeline directory")
    try:
        kind = output_kind(args.out)
    except ValueError as exc:
        return fail(str(exc))
    state = read_state(model_dir)
    timesteps = args.timesteps if args.timesteps is not None else state.get("timesteps")
    if timesteps is None:
        return fail(
            f"--timesteps is required: {model_dir} has no {STATE_FILE} or {EXPORT_META_FILE} to take it from"
        )
    if args.num < 1 or args.batch_size < 1:
        return fail("--num and --batch-size must be >= 1")
    quiet_diffusers()
    try:
        device = resolve_device(args.device)
        den = load_model(model_dir)
        chain = resolve_chain(
            den, args.timesteps, sampler=args.sampler, spacing=args.spacing, eta=args.eta, state=state
        )
    except (ModelNotFoundError, ValueError, OSError) as exc:
        return fail(str(exc))
    sampler, spacing, eta, timesteps = chain.sampler, chain.spacing, chain.eta, chain.timesteps
    t0 = time.perf_counter()
    try:
        out = write_samples(
            den,
            args.out,
            num=args.num,
            seed=args.seed,
            sampler=sampler,
            spacing=spacing,
            eta=eta,
            batch_size=args.batch_size,
            device=device,
            show_progress=not args.quiet and args.num > args.batch_size,
            grid_scale=args.grid_scale,
            chain=chain,
        )
    except ValueError as exc:
        return fail(str(exc))
    elapsed = time.perf_counter() - t0
    what = {"grid": "grid", "npz": "npz (arr_0, uint8 NHWC)", "dir": "directory of PNGs"}[kind]
    print(
        f"wrote {args.num} samples ({sampler}, T={timesteps}, {spacing}, eta={eta}, clip_sample="
        f"{chain.clip_sample}, final_clamp={chain.final_clamp}, seed={args.seed}) "
        f"to {out} [{what}] in {elapsed:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
