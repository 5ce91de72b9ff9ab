"""FID/KID of a T-step chain in one or more evaluation feature spaces, under explicit protocols.

Three roles (docs/results.md, "Protocol"):

* **selection** (the sweep objective, ASHA, the best checkpoint): the fixed validation noise ``eval.seed``
  against the selection reference (by default a seeded validation part of the training split that the MMD
  bank does not contain);
* **final** (what is reported): fresh noise seeds ``eval.final_seeds`` (k >= 3) against the held-out
  reference (the dataset's test split, or a seeded held-out fraction), mean +- std over the seeds.

Images come from the one generation loop (:func:`mmdsweep.inference.generate.generate`), so the evaluator's
images for seed S are exactly what ``mmdsweep.sample --seed S`` writes.  Every space scores real and generated
images with the same preprocessing (:class:`EvalSpace`: uint8 quantisation and clean-fid's PIL-bicubic resize,
then the network's value range and normalisation), recorded with each figure.  Metric warnings (too few
samples for a full-rank covariance, numerical trouble) are never silenced: each result carries them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from mmdsweep.assets import metrics
from mmdsweep.assets.metrics import ReferenceStats
from mmdsweep.core.sampling import ChainSpec, NoiseSchedule
from mmdsweep.inference.generate import eval_noise, generate

__all__ = [
    "EvalResult",
    "EvalSpace",
    "Evaluator",
    "FinalSummary",
    "eval_noise",
    "generate",
    "summarize_final",
]

NOISE_SEED_STRIDE = 1_000_003  # kept for imports of the old name; noise is keyed in mmdsweep.core.noise


class EvalSpace(torch.nn.Module):
    """A feature space under the evaluation protocol, identical for real and generated images.

    Images in [-1, 1] are quantised to uint8 exactly as PNGs are written (``round((x + 1) * 127.5)``), resized
    to the network's input size with clean-fid's "clean" resizer (PIL bicubic on float32 channels, clipped to
    [0, 255]; ``cleanfid.resize.make_resizer("PIL", False, "bicubic", size)``) when the sizes differ, then passed
    to the space (its own value range and normalisation).  With an Inception space at 299 this is clean-fid's
    protocol, so our FID equals clean-fid's folder computation on the PNGs ``mmdsweep.sample`` writes.
    """

    def __init__(self, space: torch.nn.Module, *, quantize: bool = True) -> None:
        super().__init__()
        self.space = space
        self.quantize = quantize
        hw = getattr(space, "input_hw", None)
        self.input_hw: tuple[int, int] | None = None if hw is None else (int(hw[0]), int(hw[1]))

    @property
    def preprocessing(self) -> str:
        """One-line description recorded with every figure of this space."""
        name = getattr(self.space, "name", type(self.space).__name__)
        size = "native size" if self.input_hw is None else f"{self.input_hw[0]}x{self.input_hw[1]}"
        vr = getattr(self.space, "value_range", None)
        norm = " +imagenet-norm" if getattr(self.space, "normalise", False) else ""
        q = "uint8-quantised, " if self.quantize else ""
        return f"{name}: {q}PIL-bicubic(clean-fid) to {size}, range {vr}{norm}"

    def _resize(self, u8: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) -> float32 (N, h, w, C) in [0, 255] with clean-fid's clean resizer."""
        from PIL import Image

        assert self.input_hw is not None
        h, w = self.input_hw
        out = np.empty((u8.shape[0], h, w, u8.shape[3]), dtype=np.float32)
        for i in range(u8.shape[0]):
            for c in range(u8.shape[3]):
                img = Image.fromarray(u8[i, :, :, c].astype(np.float32), mode="F")
                out[i, :, :, c] = np.asarray(img.resize((w, h), resample=Image.Resampling.BICUBIC)).clip(
                    0, 255
                )
        return out

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device
        if self.quantize:
            v = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round()
        else:
            v = (x.detach().float().clamp(-1, 1) + 1) * 127.5
        if self.input_hw is not None and tuple(v.shape[-2:]) != self.input_hw:
            arr = v.permute(0, 2, 3, 1).cpu().numpy()
            arr = self._resize(arr.astype(np.uint8) if self.quantize else arr)
            v = torch.from_numpy(arr).permute(0, 3, 1, 2).to(device)
        sp: Any = self.space
        if all(hasattr(sp, a) for a in ("embed", "match_channels", "value_range", "normalise", "dim")):
            # a FeatureSpace: map the [0, 255] pixels to its value range directly (no round trip through [-1, 1],
            # so a (0, 255) network sees exactly clean-fid's input)
            y = sp.match_channels(v)
            low, high = sp.value_range
            if (low, high) != (0.0, 255.0):
                y = y * ((high - low) / 255.0) + low
            if sp.normalise:
                y = (y - sp.mean) / sp.std
            return sp.embed(y).float().reshape(x.shape[0], sp.dim)
        return sp(v / 127.5 - 1.0)


@dataclass
class EvalResult:
    """Scores of one chain on one noise seed; ``fid``/``kid`` are for the primary evaluation space.

    ``per_space[name]`` holds ``fid``, ``kid``; ``preprocessing[name]`` the space's preprocessing; ``warnings``
    every metric warning raised while scoring (empty when none), never silenced.
    """

    timesteps: int
    sampler: str
    num_samples: int
    fid: float
    kid: float
    per_space: dict[str, dict[str, float]] = field(default_factory=dict)
    sample_time_per_image_s: float = float("nan")
    seed: int | None = None
    reference: str = ""
    spacing: str = ""
    chain: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Evaluator:
    """Scores a denoiser's chain against cached reference statistics (one protocol: noise seed + reference)."""

    def __init__(
        self,
        spaces: dict[str, torch.nn.Module],
        references: dict[str, ReferenceStats],
        *,
        primary: str,
        num_samples: int,
        batch_size: int,
        seed: int,
        kid_subsets: int,
        kid_subset_size: int,
        device: torch.device,
        reference_name: str = "",
    ) -> None:
        if primary not in spaces:
            raise ValueError(f"primary evaluation space {primary!r} is not among {sorted(spaces)}")
        self.spaces = spaces
        self.references = references
        self.primary = primary
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.device = device
        self.reference_name = reference_name

    def preprocessing(self) -> dict[str, str]:
        return {
            name: getattr(space, "preprocessing", f"{name}: the space's own preprocessing")
            for name, space in self.spaces.items()
        }

    def evaluate(
        self,
        eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        schedule: NoiseSchedule,
        shape: Sequence[int],
        *,
        chain: ChainSpec | None = None,
        timesteps: int | None = None,
        sampler: str = "ddim",
        spacing: str | None = None,
        eta: float = 0.0,
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
        num_samples: int | None = None,
    ) -> EvalResult:
        """Generate ``num_samples`` images of ``chain`` from noise ``seed`` (default: the evaluator's) and score
        them.  Without ``chain`` one is built from ``timesteps``/``sampler``/``spacing``/``eta`` with the
        schedule's own clipping and the final clamp."""
        if chain is None:
            if timesteps is None:
                raise ValueError("evaluate: pass chain= or timesteps=")
            chain = ChainSpec(
                sampler=sampler,
                timesteps=int(timesteps),
                spacing=spacing,  # type: ignore[arg-type]
                eta=eta,
                clip_sample=schedule.clip_sample,
                clip_sample_range=schedule.clip_sample_range,
                final_clamp=True,
            )
        seed = self.seed if seed is None else int(seed)
        num = self.num_samples if num_samples is None else int(num_samples)
        feats: dict[str, list[np.ndarray]] = {name: [] for name in self.spaces}

        def consume(start: int, x: torch.Tensor) -> None:
            del start
            self._embed(x, feats)

        _, per_image = generate(
            eps_fn,
            schedule,
            chain,
            num=num,
            shape=shape,
            seed=seed,
            batch_size=self.batch_size,
            device=self.device,
            dtype=dtype,
            on_batch=consume,
        )
        per_space, messages = self._score_spaces(feats, seed)
        main = per_space[self.primary]
        return EvalResult(
            timesteps=chain.timesteps,
            sampler=chain.sampler,
            num_samples=num,
            fid=main["fid"],
            kid=main["kid"],
            per_space=per_space,
            sample_time_per_image_s=per_image,
            seed=seed,
            reference=self.reference_name,
            spacing=chain.spacing,
            chain=chain.to_dict(),
            preprocessing=self.preprocessing(),
            warnings=messages,
        )

    @torch.no_grad()
    def evaluate_images(
        self, images: torch.Tensor | Iterable[torch.Tensor], *, seed: int, label: str = "real"
    ) -> EvalResult:
        """Score given images in [-1, 1] (real ones: the data's own FID under this protocol) in every space,
        with the same preprocessing and reference as a chain's samples.

        ``images``: one ``(N, C, H, W)`` tensor (scored in chunks of ``batch_size``) or an iterable of
        ``(n_i, C, H, W)`` batches (so N large images never sit in memory at once). The result has
        ``sampler=label``, ``timesteps=0``, ``spacing=""`` and no chain; ``seed`` is recorded (it seeds the KID
        subsets, as for samples). Raises ValueError for a batch that is not 4-d or fewer than 2 images."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise ValueError(f"evaluate_images: expected (N, C, H, W) images, got {tuple(images.shape)}")
            images = images.split(self.batch_size)
        feats: dict[str, list[np.ndarray]] = {name: [] for name in self.spaces}
        count = 0
        for batch in images:
            if batch.ndim != 4:
                raise ValueError(f"evaluate_images: expected (n, C, H, W) batches, got {tuple(batch.shape)}")
            count += int(batch.shape[0])
            self._embed(batch, feats)
        if count < 2:
            raise ValueError(f"evaluate_images: need at least 2 images, got {count}")
        per_space, messages = self._score_spaces(feats, int(seed))
        main = per_space[self.primary]
        return EvalResult(
            timesteps=0,
            sampler=label,
            num_samples=count,
            fid=main["fid"],
            kid=main["kid"],
            per_space=per_space,
            seed=int(seed),
            reference=self.reference_name,
            spacing="",
            preprocessing=self.preprocessing(),
            warnings=messages,
        )

    def _embed(self, x: torch.Tensor, feats: dict[str, list[np.ndarray]]) -> None:
        """Append the features of a batch ``x`` in every space to ``feats[space]``."""
        x = x.to(self.device)
        for name, space in self.spaces.items():
            feats[name].append(space(x).double().cpu().numpy())

    def _score_spaces(
        self, feats: dict[str, list[np.ndarray]], seed: int
    ) -> tuple[dict[str, dict[str, float]], list[str]]:
        """FID/KID per space of the collected features, and the metric warnings prefixed by the space."""
        per_space: dict[str, dict[str, float]] = {}
        messages: list[str] = []
        for name, chunks in feats.items():
            scores, warns = self._score(np.concatenate(chunks), self.references[name], seed)
            per_space[name] = scores
            messages += [f"{name}: {w}" for w in warns]
        return per_space, messages

    def _score(self, f: np.ndarray, ref: ReferenceStats, seed: int) -> tuple[dict[str, float], list[str]]:
        if not np.isfinite(f).all():
            return {"fid": float("nan"), "kid": float("nan")}, ["non-finite features: FID/KID are NaN"]
        caught: list[str] = []
        with metrics.collect_warnings(caught):
            fid = metrics.fid(f, ref)
            assert ref.feats is not None
            size = min(self.kid_subset_size, f.shape[0], ref.feats.shape[0])
            kid = metrics.kid(f, ref.feats, num_subsets=self.kid_subsets, max_subset_size=size, seed=seed)
        return {"fid": float(fid), "kid": float(kid)}, caught


@dataclass
class FinalSummary:
    """Final-protocol figure of one chain in one space: mean +- std (ddof=1) over k noise seeds."""

    space: str
    fid_mean: float
    fid_std: float
    kid_mean: float
    kid_std: float
    k: int
    num_samples: int
    reference: str
    preprocessing: str
    warnings: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self, metric: str = "fid") -> str:
        m, s = (self.fid_mean, self.fid_std) if metric == "fid" else (self.kid_mean, self.kid_std)
        return f"{m:.3f} +- {s:.3f}" if math.isfinite(s) else f"{m:.3f}"


def summarize_final(results: Sequence[EvalResult]) -> dict[str, FinalSummary]:
    """Mean and sample std (ddof=1; NaN for k=1) over the seeds of each space."""
    if not results:
        return {}
    out: dict[str, FinalSummary] = {}
    for name in results[0].per_space:
        fids = np.array([r.per_space[name]["fid"] for r in results], dtype=float)
        kids = np.array([r.per_space[name]["kid"] for r in results], dtype=float)
        k = len(results)
        warns = sorted({w for r in results for w in r.warnings if w.startswith(f"{name}: ")})
        out[name] = FinalSummary(
            space=name,
            fid_mean=float(fids.mean()),
            fid_std=float(fids.std(ddof=1)) if k > 1 else float("nan"),
            kid_mean=float(kids.mean()),
            kid_std=float(kids.std(ddof=1)) if k > 1 else float("nan"),
            k=k,
            num_samples=results[0].num_samples,
            reference=results[0].reference,
            preprocessing=results[0].preprocessing.get(name, ""),
            warnings=warns,
        )
    return out


def final_protocol(
    evaluator: Evaluator,
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    shape: Sequence[int],
    chain: ChainSpec,
    seeds: Sequence[int],
    *,
    num_samples: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[EvalResult]:
    """The final protocol: one :meth:`Evaluator.evaluate` per fresh noise seed (the evaluator holds the
    held-out reference)."""
    return [
        evaluator.evaluate(eps_fn, schedule, shape, chain=chain, seed=s, num_samples=num_samples, dtype=dtype)
        for s in seeds
    ]
