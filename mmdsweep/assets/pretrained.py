"""Where the embedded default's pretrained DDPM and classifier live in the cache (lookup only).

Training them is :func:`mmdsweep.train.pretrain.run_pretrain`; this module only names the cache
directory and reads a finished one, so that the asset layer (and ``--dry-run``) can find a
pretrained model without importing the training layer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mmdsweep.config import Experiment, expand

PRETRAIN_VERSION = "2"  # 2: the key includes exp.seed (it decides the digits train/test split)


@dataclass
class PretrainArtifacts:
    """Paths of a finished pretraining (all inside one cache directory)."""

    directory: Path
    model_dir: Path
    classifier_path: Path
    grid_path: Path
    info: dict[str, Any]


def pretrain_key(exp: Experiment) -> str:
    """Hash of everything that changes the pretrained DDPM and classifier.

    ``exp.seed`` is part of it: it draws the seeded train/held-out split the DDPM and the
    classifier are trained and measured on (see :func:`mmdsweep.assets.components.real_dataset`).
    """
    p = asdict(exp.pretrain)
    p.pop("cache_dir")
    payload = {
        "version": PRETRAIN_VERSION,
        "pretrain": p,
        "seed": exp.seed,
        "data": {
            k: getattr(exp.data, k)
            for k in ("dataset", "root", "resolution", "split", "max_images", "channels")
        },
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def pretrain_dir(exp: Experiment) -> Path:
    return expand(exp.pretrain.cache_dir) / "pretrain" / f"{exp.data.dataset}-{pretrain_key(exp)}"


def cached(exp: Experiment) -> PretrainArtifacts | None:
    """The finished pretraining of ``exp`` in the cache, or None."""
    d = pretrain_dir(exp)
    info_path = d / "info.json"
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    return PretrainArtifacts(d, d / "model", d / "classifier.safetensors", d / "samples_ddim50.png", info)
