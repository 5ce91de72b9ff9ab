"""Content checks before any expensive work (issue 10, fault 1 and part 1).

Each bad input must be refused by ``--dry-run`` (and by a real start) with exit status 2 and one
line on stderr naming the file or key, the value and the remedy: no traceback, nothing written.
Before, ``--dry-run`` said "ok" for all of them and the run died later with a traceback.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import tiny_config
from PIL import Image

from mmdsweep import tune

pytestmark = pytest.mark.usefixtures("one_thread")


def _write(tmp: Path, cfg: dict[str, Any]) -> Path:
    p = tmp / "exp.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _folder(tmp: Path, n: int = 10, corrupt: int | None = None) -> Path:
    d = tmp / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        path = d / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(path)
        if i == corrupt:
            raw = bytearray(path.read_bytes())
            k = raw.index(b"IDAT")
            raw[k + 4 : k + 20] = b"\xff" * 16  # garbage in the compressed pixel data, header intact
            path.write_bytes(bytes(raw))
    return d


def _folder_cfg(tmp: Path, root: Path) -> dict[str, Any]:
    cfg = tiny_config(tmp)
    cfg["data"] = {"dataset": "image_folder", "root": str(root), "resolution": 8, "channels": 1}
    return cfg


def _model(tmp: Path, *, resolution: int = 8, channels: int = 1, train_steps: int = 1000) -> Path:
    from mmdsweep.assets.models import build_unet, save_denoiser, scheduler_config_for

    d = tmp / "model"
    unet = build_unet(resolution, channels, block_out_channels=(8, 16))
    save_denoiser(d, unet, scheduler_config_for(train_steps, "linear", 1e-4, 0.02))
    return d


def _diffusers_cfg(tmp: Path, model: Path) -> dict[str, Any]:
    from mmdsweep.assets.classifier import DomainClassifier, save_classifier

    clf = tmp / "clf.safetensors"
    save_classifier(DomainClassifier(in_channels=1, resolution=8, width=8, feature_dim=16), clf)
    cfg = tiny_config(tmp)
    cfg["model"] = {"source": "diffusers", "path": str(model)}
    cfg["features"]["classifier_path"] = str(clf)
    return cfg


def _dry_run(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    rc = tune.main([str(path), "--dry-run", *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and "checking images" not in line]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_corrupt_image_in_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _folder(tmp_path, corrupt=3)
    rc, _, err = _dry_run(_write(tmp_path, _folder_cfg(tmp_path, root)), capsys)
    _assert_one_line(rc, err, "img03.png", "cannot decode image", "remove or replace")


def test_good_folder_verdict_is_cached(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _folder(tmp_path, n=12)
    cfg = _folder_cfg(tmp_path, root)
    p = _write(tmp_path, cfg)
    rc, out, err = _dry_run(p, capsys)
    assert rc == 0, err
    assert "12 images decode" in out and "cached" not in out
    rc, out, err = _dry_run(p, capsys)
    assert rc == 0 and "12 images decode (cached verdict)" in out
    # a changed file (new mtime/size) invalidates the verdict
    Image.new("L", (9, 9)).save(root / "img05.png")
    rc, out, err = _dry_run(p, capsys)
    assert rc == 0 and "(cached verdict)" not in out


def test_batch_larger_than_the_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _folder_cfg(tmp_path, _folder(tmp_path, n=10))
    cfg["finetune"]["batch_size"] = 16
    rc, _, err = _dry_run(_write(tmp_path, cfg), capsys)
    _assert_one_line(rc, err, "finetune.batch_size: 16", "holds 10", "at most 10")


def test_searched_real_batch_larger_than_the_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _folder_cfg(tmp_path, _folder(tmp_path, n=10))
    cfg["search"]["space"]["finetune.real_batch_size"] = {"choice": [4, 32]}
    rc, _, err = _dry_run(_write(tmp_path, cfg), capsys)
    _assert_one_line(rc, err, "finetune.real_batch_size: 32", "holds 10")


def test_truncated_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _model(tmp_path)
    w = model / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    rc, _, err = _dry_run(_write(tmp_path, _diffusers_cfg(tmp_path, model)), capsys)
    _assert_one_line(rc, err, str(w), "truncated", "re-download")


def test_config_that_does_not_match_its_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    model = _model(tmp_path)
    cfg_path = model / "unet" / "config.json"
    ucfg = json.loads(cfg_path.read_text())
    ucfg["block_out_channels"] = [16, 32]
    cfg_path.write_text(json.dumps(ucfg))
    rc, _, err = _dry_run(_write(tmp_path, _diffusers_cfg(tmp_path, model)), capsys)
    _assert_one_line(rc, err, str(cfg_path), "does not match", "shape")


def test_model_of_another_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _model(tmp_path, resolution=16, channels=3)
    rc, _, err = _dry_run(_write(tmp_path, _diffusers_cfg(tmp_path, model)), capsys)
    _assert_one_line(rc, err, "3-channel 16x16", "1-channel 8x8", "config.json")


def test_timesteps_beyond_the_models_training_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _model(tmp_path, train_steps=100)
    cfg = _diffusers_cfg(tmp_path, model)
    cfg["search"]["space"]["sampler.timesteps"] = {"choice": [2, 200]}
    rc, _, err = _dry_run(_write(tmp_path, cfg), capsys)
    _assert_one_line(
        rc, err, "sampler.timesteps", "num_train_timesteps (100), got 200", "scheduler_config.json"
    )


def test_classifier_weights_that_do_not_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _diffusers_cfg(tmp_path, _model(tmp_path))
    Path(cfg["features"]["classifier_path"]).write_bytes(b"\x00" * 64)
    rc, _, err = _dry_run(_write(tmp_path, cfg), capsys)
    _assert_one_line(rc, err, "features.classifier_path", "does not load")


def _cifar(tmp: Path, evil: bool) -> Path:
    d = tmp / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
        if evil and name == "data_batch_2":
            batch[b"x"] = subprocess.Popen  # any non-numpy global
        with (d / name).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
    return tmp


def test_cifar_pickle_with_a_disallowed_global(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(tmp_path)
    cfg["data"] = {"dataset": "cifar10", "root": str(_cifar(tmp_path, evil=True)), "resolution": 8}
    cfg["finetune"]["batch_size"] = 4
    rc, _, err = _dry_run(_write(tmp_path, cfg), capsys)
    _assert_one_line(rc, err, "data_batch_2", "Popen is not allowed")


def test_real_start_refuses_before_writing(tmp_path: Path) -> None:
    """The same checks guard a real start (no --dry-run): one line, exit 2, nothing written, in a subprocess."""
    root = _folder(tmp_path, corrupt=3)
    cfg = _folder_cfg(tmp_path, root)
    p = _write(tmp_path, cfg)
    proc = subprocess.run(
        [sys.executable, "-m", "mmdsweep.tune", str(p), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "img03.png" in lines[0], proc.stderr
    assert not (tmp_path / "results").exists()
