"""Tests of the sampling command line tool (python -m mmdsweep.sample)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sweep_fixture import build_sweep

from mmdsweep.inference import generate as S
from mmdsweep.inference.evaluation import eval_noise

NUM = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread per module


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sweep(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="module")
def pipeline(results_dir: Path) -> Path:
    """An exported pipeline directory (no state.json)."""
    return results_dir / "exported" / "T5"


@pytest.fixture(scope="module")
def checkpoint(results_dir: Path) -> Path:
    """A fine-tuning checkpoint directory (state.json says T=5)."""
    return results_dir / "checkpoints" / "t00"


def _npz(path: Path) -> np.ndarray:
    with np.load(path) as data:
        assert list(data.keys()) == ["arr_0"]
        return data["arr_0"]


def _run(*args: str | Path | int) -> int:
    return S.main([str(a) for a in args])


def test_noise_matches_evaluation_noise() -> None:
    shape = (3, 4, 4)
    full = eval_noise(7, shape, seed=11)
    torch.testing.assert_close(S.sample_noise(0, 7, shape, seed=11), full, rtol=0, atol=0)
    torch.testing.assert_close(S.sample_noise(3, 7, shape, seed=11), full[3:], rtol=0, atol=0)


def test_output_kind(tmp_path: Path) -> None:
    assert S.output_kind("grid.png") == "grid"
    assert S.output_kind("grid.JPG") == "grid"
    assert S.output_kind("x.npz") == "npz"
    assert S.output_kind("samples/") == "dir"
    assert S.output_kind("samples") == "dir"
    assert S.output_kind(tmp_path) == "dir"
    with pytest.raises(ValueError, match="unknown output kind"):
        S.output_kind("x.gif")


def test_grid_png(pipeline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "grid.png"
    assert _run(pipeline, "--timesteps", 5, "--num", NUM, "--out", out, "--quiet") == 0
    img = Image.open(out)
    # ceil(sqrt(6)) = 3 columns, 2 rows of 16x16 images with 1-pixel padding
    assert img.size == (3 * 17 + 1, 2 * 17 + 1) and img.mode == "RGB"
    assert np.asarray(img).std() > 10
    printed = capsys.readouterr().out
    assert f"wrote {NUM} samples" in printed and "T=5" in printed and str(out) in printed
    scaled = tmp_path / "big.png"
    assert _run(pipeline, "-T", 5, "-n", 4, "-o", scaled, "--grid-scale", 3, "-q") == 0
    assert Image.open(scaled).size == (3 * (2 * 17 + 1), 3 * (2 * 17 + 1))


def test_npz_and_directory_agree(pipeline: Path, tmp_path: Path) -> None:
    npz, folder = tmp_path / "s.npz", tmp_path / "pngs"
    assert _run(pipeline, "--timesteps", 5, "--num", NUM, "--out", npz, "-q") == 0
    assert _run(pipeline, "--timesteps", 5, "--num", NUM, "--out", f"{folder}/", "-q", "--batch-size", 4) == 0
    arr = _npz(npz)
    assert arr.dtype == np.uint8 and arr.shape == (NUM, 16, 16, 3)
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"{i:06d}.png" for i in range(NUM)]
    from_pngs = np.stack([np.asarray(Image.open(folder / f).convert("RGB")) for f in files])
    assert np.abs(from_pngs.astype(int) - arr.astype(int)).max() <= 1  # batch 64 vs batch 4


@pytest.mark.threads
def test_seed_determinism_and_batch_independence(pipeline: Path, tmp_path: Path) -> None:
    def npz(name: str, *extra: str | int) -> np.ndarray:
        path = tmp_path / f"{name}.npz"
        assert _run(pipeline, "--timesteps", 5, "--num", 8, "--out", path, "-q", *extra) == 0
        return _npz(path)

    a = npz("a", "--seed", 1, "--batch-size", 4)
    again = npz("again", "--seed", 1, "--batch-size", 4)
    other = npz("other", "--seed", 2, "--batch-size", 4)
    big = npz("big", "--seed", 1, "--batch-size", 16)
    np.testing.assert_array_equal(a, again)
    assert np.abs(a.astype(int) - other.astype(int)).mean() > 10
    # noise is drawn per sample: batch 4 and batch 16 give the same images (up to float rounding)
    assert np.abs(a.astype(int) - big.astype(int)).max() <= 1
    # the first images do not depend on how many are drawn (a batch of 3 against one of 8: the
    # same noise, but the convolutions may sum in another order, so one uint8 level of rounding)
    first = npz("first", "--seed", 1, "--num", 3)
    assert np.abs(first.astype(int) - big[:3].astype(int)).max() <= 1

    x4 = S.generate_images(pipeline, 5, num=8, seed=1, batch_size=4)
    x16 = S.generate_images(pipeline, 5, num=8, seed=1, batch_size=16)
    assert x4 is not None and x16 is not None
    torch.testing.assert_close(x4, x16, atol=1e-4, rtol=1e-4)


def test_eta_and_samplers(pipeline: Path) -> None:
    kw: dict[str, Any] = dict(num=5, seed=0)
    ddim = S.generate_images(pipeline, 5, **kw)
    stochastic4 = S.generate_images(pipeline, 5, eta=1.0, batch_size=4, **kw)
    stochastic2 = S.generate_images(pipeline, 5, eta=1.0, batch_size=2, **kw)
    dpm = S.generate_images(pipeline, 5, sampler="dpmpp_2m", **kw)
    assert ddim is not None and stochastic4 is not None and stochastic2 is not None and dpm is not None
    torch.testing.assert_close(stochastic4, stochastic2, atol=1e-4, rtol=1e-4)  # per-sample step noise too
    assert not torch.allclose(ddim, stochastic4, atol=1e-2)
    assert not torch.allclose(ddim, dpm, atol=1e-2)
    with pytest.raises(ValueError, match="ddim"):
        S.generate_images(pipeline, 5, num=1, eta=0.5, sampler="dpmpp_2m")


def test_defaults_from_state_json(checkpoint: Path, tmp_path: Path) -> None:
    implicit, explicit = tmp_path / "implicit.npz", tmp_path / "explicit.npz"
    assert _run(checkpoint, "--num", 4, "--out", implicit, "-q") == 0
    assert _run(checkpoint, "--num", 4, "--out", explicit, "-q", "--timesteps", 5, "--sampler", "ddim") == 0
    np.testing.assert_array_equal(_npz(implicit), _npz(explicit))
    ten = tmp_path / "ten.npz"
    assert _run(checkpoint, "--num", 4, "--out", ten, "-q", "--timesteps", 10) == 0
    assert not np.array_equal(_npz(ten), _npz(explicit))


def test_defaults_from_export_metadata(
    results_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = results_dir / "exported" / "T10"
    assert S.read_state(export)["timesteps"] == 10
    implicit, explicit = tmp_path / "implicit.npz", tmp_path / "explicit.npz"
    assert _run(export, "--num", 3, "--out", implicit, "-q") == 0
    assert "T=10" in capsys.readouterr().out
    assert _run(export, "--num", 3, "--out", explicit, "-q", "-T", 10) == 0
    np.testing.assert_array_equal(_npz(implicit), _npz(explicit))


def test_errors(pipeline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert _run(missing, "--timesteps", 5, "--out", tmp_path / "x.png") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and len(err.strip().splitlines()) == 1
    assert _run(pipeline, "--out", tmp_path / "x.png") == 2
    assert "--timesteps is required" in capsys.readouterr().err
    assert _run(pipeline, "--timesteps", 5, "--out", tmp_path / "x.gif") == 2
    assert "unknown output kind" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(empty, "--timesteps", 5, "--out", tmp_path / "x.png") == 2
    assert "no unet found" in capsys.readouterr().err
    some_file = tmp_path / "file.txt"
    some_file.write_text("x")
    assert _run(some_file, "--timesteps", 5, "--out", tmp_path / "x.png") == 2
    assert "is a file" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_progress_bar(pipeline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(pipeline, "-T", 2, "-n", 6, "-o", tmp_path / "p", "--batch-size", 2) == 0
    err = capsys.readouterr().err
    assert "sampling T=2" in err and "3/3" in err
    assert len(list((tmp_path / "p").glob("*.png"))) == 6


def test_module_entry_point(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmdsweep.sample",
            str(checkpoint),
            "--num",
            "4",
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and "T=5" in proc.stdout
    assert "accelerate" not in proc.stderr


def test_sample_reproduces_the_evaluators_images_exactly(tiny_root: Path, tmp_path: Path) -> None:
    """issue 7: evaluation drew step noise per batch and ``sample`` per sample; both now use the one loop and
    the one noise owner, so ``mmdsweep.sample --seed S`` writes exactly the images evaluated with seed S."""
    from mmdsweep.assets import components as comp
    from mmdsweep.assets.metrics import ReferenceStats
    from mmdsweep.config import load_experiment
    from mmdsweep.core.sampling import ChainSpec
    from mmdsweep.inference.evaluation import Evaluator
    from mmdsweep.utils import to_uint8

    model = comp.resolve_model_source(load_experiment(tiny_root / "tiny.yaml")).model_dir
    seen: list[torch.Tensor] = []

    class Capture(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.clone())
            return x.flatten(1)[:, :3].double()

    ref = ReferenceStats.from_feats("r", np.random.default_rng(0).normal(size=(20, 3)))
    ev = Evaluator(
        {"c": Capture()},
        {"c": ref},
        primary="c",
        num_samples=NUM,
        batch_size=4,
        seed=17,
        kid_subsets=1,
        kid_subset_size=4,
        device=torch.device("cpu"),
    )
    den = S.load_model(model)
    chain = ChainSpec(sampler="ddim", timesteps=3, eta=1.0, clip_sample=False)
    ev.evaluate(den.eps_fn(), den.schedule, (1, 8, 8), chain=chain)
    evaluated = torch.cat(seen)
    for bs in (4, NUM):  # same batch split as the evaluator, and one batch (same noise per sample)
        x = S.generate_images(model, num=NUM, seed=17, batch_size=bs, chain=chain)
        assert x is not None
        if bs == 4:
            assert torch.equal(x, evaluated)
        else:
            torch.testing.assert_close(x, evaluated, atol=1e-5, rtol=0)  # conv round-off by batch size only
    out = tmp_path / "png/"
    S.write_samples(model, out, num=NUM, seed=17, batch_size=4, chain=chain)
    from PIL import Image

    pngs = np.stack([np.asarray(Image.open(p)) for p in sorted(Path(out).glob("*.png"))])
    np.testing.assert_array_equal(pngs, to_uint8(evaluated)[..., 0])
