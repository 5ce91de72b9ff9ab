"""Content checks of an experiment's inputs, run by ``--dry-run`` and at the start of a sweep.

:func:`mmdsweep.assets.components.preflight` checks that every named file *exists*; the checks
here look *inside* them, cheaply, before any expensive work (pretraining, Ray, trials):

- every image of an image folder / CelebA decodes (a full pass with a progress bar; the verdict
  is cached under ``<cache_dir>/checks`` keyed by the file list, mtimes and sizes);
- CIFAR-10 batches unpickle with the allow-listed globals only;
- a diffusers model's ``config.json`` matches its weights (shapes read from the safetensors
  header against a UNet built on the meta device: nothing is loaded), a truncated weights file
  is named, and the model's channels / resolution match the experiment's data;
- ``sampler.timesteps`` (every searched value too) fits the model's ``num_train_timesteps``;
- feature-space weights files are readable (and the domain classifier loads);
- batch sizes fit the data (``finetune.batch_size`` x workers / ``real_batch_size`` <= the bank,
  ``eval.num_reference`` <= the data);
- resources fit the machine or the Ray cluster at ``resources.address`` (:func:`check_resources`);
- output directories are writable directories (:func:`check_output_dirs`).

Every failure is a :class:`ContentError`: one line naming the file or key, the value and the
remedy (the CLIs print it without a traceback and exit with status 2).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import struct
import sys
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mmdsweep import config
from mmdsweep.config import ConfigError, Experiment, expand


class ContentError(ConfigError):
    """An input exists but its content cannot work with the experiment (one line, with the remedy)."""


# ----------------------------------------------------------------------------- helpers


def _searched(params: Sequence[Any] | None, key: str) -> list[Any]:
    """Every value the search can give ``key`` (choices, or the bounds of a range)."""
    out: list[Any] = []
    for p in params or ():
        if p.key != key:
            continue
        out.extend(p.choices if p.kind == "choice" else [p.low, p.high])
    return out


def _values(exp: Experiment, params: Sequence[Any] | None, key: str) -> list[Any]:
    from mmdsweep.config import get_dotted

    return [get_dotted(exp.to_dict(), key), *_searched(params, key)]


def _cache_dir(exp: Experiment) -> Path:
    return expand(exp.pretrain.cache_dir) / "checks"


def _verdict_key(kind: str, files: Iterable[Path], extra: str = "") -> str:
    h = hashlib.sha256(f"{kind}|{extra}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_mtime_ns}|{st.st_size}\n".encode())
    return f"{kind}-{h.hexdigest()[:24]}"


def _cached_ok(exp: Experiment, key: str) -> dict[str, Any] | None:
    path = _cache_dir(exp) / f"{key}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("ok") else None


def _remember_ok(exp: Experiment, key: str, info: dict[str, Any]) -> None:
    """Cache a passed verdict (best effort: a read-only cache only costs a re-check)."""
    from mmdsweep.utils import atomic_write_text

    try:
        d = _cache_dir(exp)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / f"{key}.json", json.dumps({"ok": True, **info}))
    except OSError:
        pass


# ----------------------------------------------------------------------------- data


def check_data(exp: Experiment, *, progress: bool = True) -> tuple[str, int]:
    """Decode/unpickle the training data once; return a summary line and the number of images."""
    from mmdsweep.assets import data as data_mod

    name = exp.data.dataset
    root = None if exp.data.root is None else Path(exp.data.root).expanduser()
    if name in ("image_folder", "celeba"):
        files = (
            data_mod._folder_files(root, exp.data.split, exp.data.max_images)
            if name == "image_folder"
            else data_mod._celeba_files(root, exp.data.split, exp.data.max_images)
        )
        key = _verdict_key(name, files)
        if _cached_ok(exp, key):
            return f"{len(files)} images decode (cached verdict)", len(files)
        _decode_all(files, progress=progress)
        _remember_ok(exp, key, {"n": len(files)})
        return f"{len(files)} images decode", len(files)
    if name == "cifar10":
        batches = data_mod._cifar_split_files(data_mod._cifar_dir(root), exp.data.split)
        key = _verdict_key("cifar10", batches)
        cached = _cached_ok(exp, key)
        if cached:
            n = int(cached["n"])
        else:
            n = 0
            for path in batches:
                try:
                    _pixels, labels = data_mod._load_cifar_batch(path)
                except data_mod.DatasetError as e:
                    raise ContentError(_first_line(e)) from None
                n += len(labels)
            _remember_ok(exp, key, {"n": n})
        if exp.data.max_images is not None:
            n = min(n, exp.data.max_images)
        return f"{len(batches)} CIFAR-10 batch file(s) unpickle, {n} images", n
    if name == "digits":
        ds = data_mod.build_dataset(
            "digits", resolution=exp.data.resolution, split=exp.data.split, max_images=exp.data.max_images,
            seed=exp.seed,
        )  # fmt: skip
        return f"{len(ds)} digits", len(ds)
    if name == "lsun":
        path = data_mod._lsun_dir(root, exp.data.split)
        n = data_mod._lmdb_entries(path)
        if exp.data.max_images is not None:
            n = min(n, exp.data.max_images)
        return f"LSUN LMDB with {n} entries (entries decode lazily, not checked one by one)", n
    return "not content-checked", -1


def _decode_all(files: Sequence[Path], *, progress: bool) -> None:
    from PIL import Image

    from mmdsweep.assets import data as data_mod

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc="checking images", unit="img", file=sys.stderr, disable=None)
    try:
        for f in files:
            try:
                with Image.open(f) as image:
                    image.load()
                    data_mod.to_mode(image, "RGB")
            except Exception as e:  # noqa: BLE001 - PIL raises many kinds on corrupt files
                raise ContentError(
                    f"data.root: {f}: cannot decode image ({type(e).__name__}: {_first_line(e)}); "
                    "remove or replace the file"
                ) from None
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_batch_sizes(exp: Experiment, params: Sequence[Any] | None, n_data: int) -> str:
    """Generated x workers / real batch sizes against the bank (the training data), eval sizes."""
    if n_data < 0:
        return "batch sizes: not checked (data size unknown)"
    where = f"{exp.source}: "
    workers = max(int(w) for w in _values(exp, params, "resources.num_workers"))
    real = [v for v in _values(exp, params, "finetune.real_batch_size") if v is not None]
    if real:
        top = max(int(v) for v in real)
        if top > n_data:
            raise ContentError(
                f"{where}finetune.real_batch_size: {top} real images per step but the data "
                f"({exp.data.dataset} {exp.data.root or ''}".rstrip()
                + f") holds {n_data}; set it to at most {n_data} or add images"
            )
    if exp.finetune.real_batch_size is None or _searched(params, "finetune.real_batch_size"):
        top_b = max(int(v) for v in _values(exp, params, "finetune.batch_size"))
        need = top_b * workers
        if need > n_data and exp.finetune.real_batch_size is None:
            raise ContentError(
                f"{where}finetune.batch_size: {top_b} per worker x {workers} worker(s) = {need} real images "
                f"per step but the data holds {n_data}; set finetune.batch_size to at most "
                f"{n_data // workers} or finetune.real_batch_size to at most {n_data}"
            )
    if exp.eval.num_reference is not None and exp.eval.num_reference > n_data:
        raise ContentError(
            f"{where}eval.num_reference: {exp.eval.num_reference} but the data holds {n_data}; "
            f"set it to at most {n_data} (or null for all)"
        )
    if n_data < 2:
        raise ContentError(f"{where}data: {n_data} image(s); FID/KID need at least 2 reference images")
    return f"batch sizes fit the data ({n_data} images)"


# ----------------------------------------------------------------------------- model


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names -> dtype/shape/offsets), checked for
    truncation against the file size, without reading the tensors."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise ContentError(
            f"{path}: not a readable safetensors file ({_first_line(e)}); re-download or re-save it"
        ) from None
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = max(end, int(info["data_offsets"][1]))
    if 8 + n + end > size:
        raise ContentError(
            f"{path}: truncated ({size} bytes, its header needs {8 + n + end}); re-download or re-save the weights"
        )
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _weight_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    if weights.suffix == ".safetensors":
        return {k: tuple(v["shape"]) for k, v in read_safetensors_header(weights).items()}
    import torch

    try:
        sd = torch.load(str(weights), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds on a bad file
        raise ContentError(
            f"{weights}: cannot be read ({_first_line(e)}); re-download or re-save the weights"
        ) from None
    return {k: tuple(v.shape) for k, v in sd.items()}


def check_unet(unet_dir: Path, weights: Path) -> dict[str, Any]:
    """``config.json`` against the weights' shapes, on the meta device; returns the config."""
    import torch
    from diffusers import UNet2DModel

    cfg_path = unet_dir / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ContentError(f"{cfg_path}: not valid JSON ({_first_line(e)}); re-download the model") from None
    shapes = _weight_shapes(weights)
    try:
        with torch.device("meta"):
            model = UNet2DModel.from_config(cfg)
    except Exception as e:  # noqa: BLE001
        raise ContentError(f"{cfg_path}: does not describe a UNet2DModel ({_first_line(e)})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [
        (k, expected[k], shapes[k]) for k in sorted(set(expected) & set(shapes)) if expected[k] != shapes[k]
    ]
    if missing or unexpected or wrong:
        if wrong:
            k, want, got = wrong[0]
            what = f"{k} has shape {list(got)} in the weights but {list(want)} by the config"
        elif missing:
            what = f"{len(missing)} tensor(s) of the config missing from the weights (e.g. {missing[0]})"
        else:
            what = (
                f"{len(unexpected)} tensor(s) in the weights the config does not have (e.g. {unexpected[0]})"
            )
        raise ContentError(
            f"{cfg_path}: does not match {weights.name}: {what}; use the config.json that came with these weights"
        )
    return dict(cfg)


def check_model(exp: Experiment, params: Sequence[Any] | None) -> str:
    """The model's weights against its config, its shape against the data, T against its training steps."""
    from mmdsweep.assets import models

    if exp.model.source == "diffusers":
        assert exp.model.path is not None
        root = models.resolve_model_dir(exp.model.path, exp.model.revision)
    else:
        from mmdsweep.assets import pretrained

        art = pretrained.cached(exp)
        if art is None:
            return "model: embedded default, trained first (checked after pretraining)"
        assert art is not None
        root = Path(art.model_dir)
    unet_dir = models._find_component(root, exp.model.unet_subfolder, ("config.json",), "unet")
    weights = next((unet_dir / w for w in models.WEIGHT_NAMES if (unet_dir / w).is_file()), None)
    if weights is None:
        raise models.ModelNotFoundError(f"model.path: {unet_dir} has config.json but no weights")
    cfg = check_unet(unet_dir, weights)
    size = cfg.get("sample_size")
    size = int(size[0] if isinstance(size, list | tuple) else size) if size is not None else None
    ch = int(cfg.get("in_channels", 3))
    want_ch = (
        exp.data.channels if exp.data.channels is not None else (1 if exp.data.dataset == "digits" else None)
    )
    if size is not None and size != exp.data.resolution or (want_ch is not None and ch != want_ch):
        raise ContentError(
            f"{unet_dir / 'config.json'}: the model is {ch}-channel {size}x{size} but the experiment "
            f"({exp.source}) is {want_ch or ch}-channel {exp.data.resolution}x{exp.data.resolution} "
            "(data.channels, data.resolution); use a model trained at that shape or set the data to match"
        )
    sched_dir = models._find_component(
        root, exp.model.scheduler_subfolder, ("scheduler_config.json",), "scheduler"
    )
    try:
        sched = json.loads((sched_dir / "scheduler_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ContentError(
            f"{sched_dir / 'scheduler_config.json'}: not valid JSON ({_first_line(e)})"
        ) from None
    n_train = int(sched.get("num_train_timesteps", 1000))
    check_timesteps_against(exp, n_train, params, where=str(sched_dir / "scheduler_config.json"))
    return f"model: {weights} matches its config ({ch}x{size}x{size}, {n_train} training steps)"


def check_timesteps_against(
    exp: Experiment, n: int, params: Sequence[Any] | None = None, where: str = ""
) -> None:
    """Every value of ``sampler.timesteps`` (searched ones too) must be <= the model's training steps
    (the rule is :func:`mmdsweep.config.check_timesteps_against`; ``where`` names the model file)."""
    del params  # the searched values come from exp.search.space
    try:
        config.check_timesteps_against(exp, n)
    except ConfigError as e:
        raise ContentError(f"{e} ({where})" if where else str(e)) from None


def check_feature_names(exp: Experiment) -> None:
    """Check that every ``torchvision:<arch>`` feature space (also in ``search.space``) names a model
    in ``torchvision.models.list_models()``. Imports torchvision (lazily): CLIs call it after
    :func:`load_experiment`, once importing torch is acceptable."""
    names = [("features.train", exp.features.train), ("features.eval", exp.features.eval)]
    names += [(f"features.extra_eval[{i}]", n) for i, n in enumerate(exp.features.extra_eval)]
    for p in config.validate_space(exp.search.space) if exp.search.space else []:
        if p.key in ("features.train", "features.eval"):
            names += [(f"search.space.{p.key}", v) for v in p.choices if isinstance(v, str)]
    wanted = [(k, n.split(":", 1)[1]) for k, n in names if n.startswith("torchvision:")]
    if not wanted:
        return
    import torchvision

    available = set(torchvision.models.list_models())
    for where, arch in wanted:
        if arch not in available:
            close = difflib.get_close_matches(arch, sorted(available), n=1)
            hint = f"; did you mean 'torchvision:{close[0]}'?" if close else ""
            raise ConfigError(
                config._one_line(
                    f"{exp.source}: {where}: torchvision has no model {arch!r}{hint} "
                    "(see torchvision.models.list_models())"
                )
            )


# ----------------------------------------------------------------------------- feature weights


def _check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (OSError, zipfile.BadZipFile) as e:
        raise ContentError(
            f"{path}: not a readable PyTorch/TorchScript file ({_first_line(e)}); re-download it"
        ) from None


def check_feature_files(exp: Experiment, names: Iterable[str], src_classifier: str | None) -> list[str]:
    """Feature-space weights files open (zip/safetensors structure) and the classifier loads with shapes."""
    from mmdsweep.assets import features as feat_mod

    lines: list[str] = []
    f = exp.features
    for name in sorted(set(names)):
        path: Path | None = None
        if name == "classifier":
            cp = f.classifier_path or src_classifier
            if cp and Path(cp).expanduser().is_file():
                from mmdsweep.assets.classifier import load_classifier

                try:
                    load_classifier(Path(cp).expanduser())
                except Exception as e:  # noqa: BLE001
                    raise ContentError(
                        f"features.classifier_path: {cp}: does not load ({_first_line(e)}); retrain it with mmdsweep.pretrain"
                    ) from None
                lines.append(f"features: classifier {cp} loads")
            continue
        if name == "inception":
            path = (
                Path(f.inception_path).expanduser() if f.inception_path else feat_mod.default_inception_path()
            )
        elif name.startswith("clip") and f.clip_pretrained and Path(f.clip_pretrained).expanduser().is_file():
            path = Path(f.clip_pretrained).expanduser()
        if path is None or not path.is_file():
            continue
        if path.suffix == ".safetensors":
            read_safetensors_header(path)
        else:
            _check_zip(path)
        lines.append(f"features: {name} weights {path} readable")
    return lines


# ----------------------------------------------------------------------------- resources


def check_resources(exp: Experiment, *, cluster: dict[str, float] | None = None) -> str:
    """Whether one trial fits the machine (or the Ray cluster at ``resources.address``).

    ``cluster`` (``{"CPU": n, "GPU": m}``) is what the cluster at ``resources.address`` offers
    (the sweep layer reads it: :func:`mmdsweep.sweep.raytrain.cluster_resources`); without an
    address, this machine is measured (``resources.num_cpus`` or ``os.cpu_count()``,
    ``torch.cuda.device_count()``).
    """
    r = exp.resources
    where = f"{exp.source}: "
    if cluster is None:
        if r.address and r.address != "local":
            raise ValueError("check_resources: pass cluster= (mmdsweep.sweep.raytrain.cluster_resources)")
        else:
            import torch

            cluster = {
                "CPU": float(r.num_cpus or os.cpu_count() or 1),
                "GPU": float(torch.cuda.device_count()),
            }
            what = "this machine"
    else:
        what = "the cluster"
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    nw = r.num_workers
    dev = exp.finetune.device
    if dev.startswith("cuda") and gpus < 1:
        raise ContentError(
            f"{where}finetune.device: {dev!r} but {what} has no CUDA device; use 'auto' or 'cpu'"
        )
    if dev.startswith("cuda:") and dev[5:].isdigit() and int(dev[5:]) >= gpus:
        raise ContentError(
            f"{where}finetune.device: {dev!r} but {what} has {gpus:g} GPU(s) (cuda:0..cuda:{max(0, int(gpus) - 1)})"
        )
    if r.use_gpu:
        need = nw * r.gpus_per_worker
        if need > gpus + 1e-9:
            fit = math.floor(gpus / r.gpus_per_worker + 1e-9) if r.gpus_per_worker > 0 else nw
            raise ContentError(
                f"{where}resources.gpus_per_worker: {r.gpus_per_worker:g} GPUs per worker x {nw} worker(s) = "
                f"{need:g} but {what} has {gpus:g}; at most {fit} worker(s) x {r.gpus_per_worker:g} or "
                f"{nw} worker(s) x {gpus / nw:g} fit" + ("" if gpus else " (set resources.use_gpu: false)")
            )
    need_cpu = r.trial_cpus + nw * r.cpus_per_worker
    if need_cpu > cpus + 1e-9:
        per = max(0.0, (cpus - r.trial_cpus) / nw)
        raise ContentError(
            f"{where}resources.cpus_per_worker: {r.cpus_per_worker:g} CPUs per worker but {what} has {cpus:g}; "
            f"at most {max(0.0, cpus - r.trial_cpus):g} ({nw} worker x {per:g}) fit beside the trial's "
            f"resources.trial_cpus {r.trial_cpus:g}"
        )
    return (
        f"resources: one trial needs {need_cpu:g} CPU" + (f" + {nw * r.gpus_per_worker:g} GPU" if r.use_gpu else "")
        + f"; {what} has {cpus:g} CPU, {gpus:g} GPU"
    )  # fmt: skip


# ----------------------------------------------------------------------------- output directories


def _check_dir_target(key: str, path: Path, where: str) -> None:
    """``path`` can be created as (or is) a writable directory: no regular file on the way."""
    p = path
    while True:
        if p.exists():
            if not p.is_dir():
                what = "is" if p == path else "is under"
                raise ContentError(
                    f"{where}{key}: {path} {what} the regular file {p}; choose a directory path"
                )
            if not os.access(p, os.W_OK | os.X_OK):
                raise ContentError(f"{where}{key}: {p} is not writable; choose a writable directory")
            return
        if p.parent == p:
            return
        p = p.parent


def check_output_dirs(exp: Experiment) -> str:
    """``output.dir`` (and a local ``output.storage``, ``pretrain.cache_dir``) can hold directories."""
    where = f"{exp.source}: "
    out = expand(exp.output.dir)
    _check_dir_target("output.dir", out, where)
    _check_dir_target("output.dir", out / exp.output.name, where)
    if exp.output.storage and "://" not in exp.output.storage:
        _check_dir_target("output.storage", expand(exp.output.storage), where)
    _check_dir_target("pretrain.cache_dir", expand(exp.pretrain.cache_dir), where)
    return f"output: {out / exp.output.name} writable"


# ----------------------------------------------------------------------------- all


def check_content(
    exp: Experiment, params: Sequence[Any] | None = None, *, progress: bool = True
) -> list[str]:
    """Every content check of this module, in order of cost; lines for ``--dry-run``."""
    check_feature_names(exp)
    lines = [check_output_dirs(exp)]
    summary, n = check_data(exp, progress=progress)
    lines.append(f"data content: {summary}")
    lines.append(check_batch_sizes(exp, params, n))
    lines.append(check_model(exp, params))
    names = {exp.features.train, exp.features.eval, *exp.features.extra_eval}
    names.update(str(v) for v in _searched(params, "features.train"))
    clf = None
    if exp.model.source == "pretrain":
        from mmdsweep.assets import pretrained

        art = pretrained.cached(exp)
        clf = str(art.classifier_path) if art is not None and art.classifier_path.is_file() else None
    lines += check_feature_files(exp, names, clf)
    return lines
