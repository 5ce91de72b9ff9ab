"""The evaluation protocol: data roles disjoint by construction and in the cache keys, the final protocol's
seeds/reference/N, evaluation.parquet, mean +- std, the gain against the best baseline, clean-fid equality."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from mmdsweep.assets import components as comp
from mmdsweep.config import ConfigError, from_dict, load_experiment

pytestmark = pytest.mark.usefixtures("one_thread")


def _exp(**eval_over: Any) -> Any:
    raw: dict[str, Any] = {"data": {"dataset": "digits", "resolution": 8}, "eval": eval_over}
    return from_dict(raw)


def test_digits_roles_are_disjoint_and_cover_the_data() -> None:
    exp = _exp()
    full = comp.real_dataset(exp)
    idx = comp._role_indices(exp, len(full))
    bank, val = set(idx["bank"]), set(idx["validation"])
    assert not bank & val and len(bank) + len(val) == len(full) and idx["heldout"] == []
    assert len(val) == round(0.1 * len(full))
    # the held-out reference is the digits test split: disjoint from the training split by construction
    test_ds, _ = comp.role_dataset(exp, "heldout")
    train_imgs = {full[i][0].numpy().tobytes() for i in range(len(full))}
    test_imgs = [test_ds[i][0].numpy().tobytes() for i in range(len(test_ds))]
    assert len(test_ds) == 1797 - len(full)
    assert sum(t in train_imgs for t in test_imgs) <= 3  # digits has a few exact duplicate images
    assert len(comp.role_dataset(exp, "bank")[0]) == len(bank)


def test_folder_datasets_carve_a_seeded_heldout_fraction() -> None:
    class E:  # a non-digits experiment shape for _role_indices
        seed = 4
        data = type("D", (), {"dataset": "image_folder"})()
        eval = type(
            "V",
            (),
            {"heldout_fraction": 0.2, "validation_fraction": 0.1, "selection_reference": "validation"},
        )()

    idx = comp._role_indices(E(), 100)  # type: ignore[arg-type]
    parts = [set(idx[k]) for k in ("heldout", "validation", "bank")]
    assert [len(p) for p in parts] == [20, 10, 70]
    assert set().union(*parts) == set(range(100)) and sum(len(p) for p in parts) == 100
    assert idx == comp._role_indices(E(), 100)  # type: ignore[arg-type]


def test_cache_keys_change_with_everything_that_changes_content() -> None:
    base = _exp()
    ids = {comp.role_dataset(base, r)[1] for r in ("bank", "validation", "heldout", "train")}
    assert len(ids) == 4
    other_seed = from_dict({"seed": 1, "data": {"dataset": "digits", "resolution": 8}})
    assert comp.real_dataset_id(other_seed) != comp.real_dataset_id(base)  # old code: same id, other split
    assert comp.role_dataset(other_seed, "bank")[1] != comp.role_dataset(base, "bank")[1]
    frac = _exp(validation_fraction=0.2)
    assert comp.role_dataset(frac, "bank")[1] != comp.role_dataset(base, "bank")[1]


@pytest.mark.parametrize(
    ("over", "key"),
    [
        ({"final_seeds": [12345]}, "final_seeds"),  # equal to eval.seed: not fresh
        ({"final_seeds": [1, 1]}, "final_seeds"),
        ({"validation_fraction": 0.7}, "validation_fraction"),
        ({"heldout_fraction": 0.0}, "heldout_fraction"),
    ],
)
def test_eval_keys_are_validated(over: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        _exp(**over)


def test_summary_gain_and_parquet(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from mmdsweep import evaluate as ev

    def row(kind: str, sampler: str, seed: int, fid: float) -> dict[str, Any]:
        return {
            "kind": kind,
            "model": "m",
            "trial_id": None,
            "sampler": sampler,
            "spacing": "leading",
            "timesteps": 5,
            "space": "classifier",
            "protocol": "final",
            "seed": seed,
            "reference": "digits:heldout",
            "num_samples": 10,
            "fid": fid,
            "kid": 0.0,
            "warnings": "",
        }

    rows = [row("model", "ddim", s, f) for s, f in ((1, 1.0), (2, 1.2), (3, 1.1))]
    rows += [row("baseline", "dpmpp_2m", s, f) for s, f in ((1, 2.0), (2, 2.2), (3, 2.1))]
    rows += [row("baseline", "unipc", s, f) for s, f in ((1, 3.0), (2, 3.2), (3, 3.1))]
    summ = ev.summarize(rows)
    m = summ[summ["kind"] == "model"].iloc[0]
    assert math.isclose(m["fid_mean"], 1.1) and math.isclose(m["fid_std"], 0.1) and m["k"] == 3
    best = ev.best_baselines(summ, "classifier").iloc[0]
    assert best["sampler"] == "dpmpp_2m"
    g = ev.gain_vs_best_baseline(m["fid_mean"], m["fid_std"], best["fid_mean"], best["fid_std"])
    assert math.isclose(g["gain"], 1.0) and g["beyond_2std"]
    assert not ev.gain_vs_best_baseline(1.0, 0.3, 1.2, 0.3)["beyond_2std"]
    path = ev.write_evaluation(rows, tmp_path / "evaluation.parquet")
    t = pq.read_table(path)
    assert t.schema.metadata[b"mmdsweep.evaluation_schema_version"] == ev.EVALUATION_SCHEMA_VERSION.encode()
    assert t.num_rows == 9 and t.schema.names == ev.evaluation_schema().names
    ev.write_evaluation(rows[:1], path)  # appends
    assert pq.read_table(path).num_rows == 10


def test_final_protocol_and_cached_baselines(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import tiny_config

    from mmdsweep import evaluate as ev

    cfg = tiny_config(tiny_root)
    cfg["eval"].update({"final_seeds": [7, 8, 9], "final_num_samples": 12, "kid_subset_size": 6})
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    exp = load_experiment(tmp_path / "t.yaml")
    src = comp.resolve_model_source(exp)
    ev_final = ev.build_final_evaluator(exp, 1, torch.device("cpu"))
    assert ev_final.reference_name == "digits:heldout" and ev_final.num_samples == 12

    def baselines() -> list[dict[str, Any]]:
        return ev.baseline_rows(
            exp,
            src.model_dir,
            [2],
            ev_final,
            samplers=("ddim", "unipc"),
            spacings=("leading", "trailing"),
            cache_dir=tmp_path / "cache",
        )

    rows = baselines()
    assert {(r["sampler"], r["spacing"], r["seed"]) for r in rows} == {
        (a, b, s) for a in ("ddim", "unipc") for b in ("leading", "trailing") for s in (7, 8, 9)
    }
    assert all(
        r["num_samples"] == 12 and r["reference"] == "digits:heldout" and r["preprocessing"] for r in rows
    )
    assert all("rank-deficient" in r["warnings"] for r in rows)  # 12 samples, 128-d: surfaced, not hidden
    # different seeds give different figures (fresh noise), and the second call is served from the cache
    fids = [r["fid"] for r in rows if r["sampler"] == "ddim" and r["spacing"] == "leading"]
    assert len(set(fids)) == 3
    monkeypatch.setattr(
        ev, "final_rows_for_model", lambda *a, **k: pytest.fail("recomputed a cached baseline")
    )
    again = baselines()
    assert [r["fid"] for r in again] == [r["fid"] for r in rows]


def test_real_floor_scores_bank_images_under_the_final_protocol(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The floor rows score real training images of the bank (never the held-out reference), a seeded subset
    per final seed with the protocol's N; with N above the bank size every seed scores the whole bank, and the
    FID then equals clean-fid's fid_from_feats on the same features; the rows are cached."""
    from cleanfid.fid import fid_from_feats
    from conftest import tiny_config

    from mmdsweep import evaluate as ev
    from mmdsweep.results.evaluation import final_comparison

    cfg = tiny_config(tiny_root)
    cfg["eval"].update(
        {"final_seeds": [7, 8, 9], "final_num_samples": 40, "kid_subset_size": 20, "batch_size": 16}
    )
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    exp = load_experiment(tmp_path / "t.yaml")
    evaluator = ev.build_final_evaluator(exp, 1, torch.device("cpu"))
    bank, _ = comp.role_dataset(exp, "bank", 1)
    bank_x = torch.stack([bank[i][0] for i in range(len(bank))])
    heldout, _ = comp.role_dataset(exp, "heldout", 1)
    held_x = torch.stack([heldout[i][0] for i in range(len(heldout))])

    seen: list[torch.Tensor] = []
    score = evaluator.evaluate_images

    def spy(images: Any, **kw: Any) -> Any:
        batches = list(images)  # streamed batch by batch (eval.batch_size), never all N images at once
        assert [len(b) for b in batches] == [16, 16, 8]
        seen.append(torch.cat(batches))
        return score(batches, **kw)

    monkeypatch.setattr(evaluator, "evaluate_images", spy)
    rows = ev.real_floor_rows(exp, evaluator, 1, cache_dir=tmp_path / "cache")
    assert {(r["kind"], r["sampler"], r["timesteps"], r["seed"], r["space"]) for r in rows} == {
        ("real", "real", 0, s, "classifier") for s in (7, 8, 9)
    }
    assert all(
        r["num_samples"] == 40 and r["reference"] == "digits:heldout" and r["preprocessing"] for r in rows
    )
    flat_bank = bank_x.flatten(1)
    for images in seen:
        assert images.shape == (40, *bank_x.shape[1:])
        match = (images.flatten(1)[:, None, :] == flat_bank[None]).all(-1)
        assert match.any(1).all() and len(set(match.int().argmax(1).tolist())) == 40  # distinct bank images
        assert not (images.flatten(1)[:, None, :] == held_x.flatten(1)[None]).all(-1).any()
    assert len({r["fid"] for r in rows}) == 3  # a fresh subset per seed
    monkeypatch.setattr(
        evaluator, "evaluate_images", lambda *a, **k: pytest.fail("recomputed a cached floor")
    )
    assert ev.real_floor_rows(exp, evaluator, 1, cache_dir=tmp_path / "cache") == rows

    with pytest.raises(ValueError, match="at least 2 images"):
        score(bank_x[:1], seed=7)
    # N above the bank: the whole bank for every seed, equal to clean-fid on the same features
    big = exp.with_overrides({"eval.final_num_samples": len(bank) + 50})
    big_eval = ev.build_final_evaluator(big, 1, torch.device("cpu"))
    whole = ev.real_floor_rows(big, big_eval, 1, cache_dir=tmp_path / "cache")
    assert {r["num_samples"] for r in whole} == {len(bank)} and len({round(r["fid"], 9) for r in whole}) == 1
    space = big_eval.spaces["classifier"]
    expected = fid_from_feats(space(bank_x).double().numpy(), space(held_x).double().numpy())
    assert whole[0]["fid"] == pytest.approx(expected, rel=1e-4)  # float32 features in batches of 48 vs one

    # the comparison carries the floor of the model's space and reference
    model_rows = [
        {
            **r,
            "kind": "model",
            "sampler": "ddim",
            "timesteps": 3,
            "trial_id": "t",
            "model": "m",
            "fid": r["fid"] + 1.0,
        }
        for r in rows
    ]
    comp_df = final_comparison(model_rows + rows, "classifier")
    assert comp_df["floor_fid_mean"].iloc[0] == pytest.approx(float(np.mean([r["fid"] for r in rows])))
    assert comp_df["floor_num_samples"].iloc[0] == 40
    assert math.isnan(final_comparison(model_rows, "classifier")["floor_fid_mean"].iloc[0])


def test_fid_equals_cleanfid_folder_computation(tiny_root: Path, tmp_path: Path) -> None:
    """Our FID of the PNGs mmdsweep.sample writes equals clean-fid's compute_fid(folder, folder, mode="clean")
    with the same (random, TorchScript) network: same uint8 quantisation, same PIL-bicubic resize to 299."""
    from cleanfid import fid as cfid
    from PIL import Image

    from mmdsweep.assets import metrics as M
    from mmdsweep.assets.features import FeatureSpace
    from mmdsweep.inference.evaluation import EvalSpace
    from mmdsweep.inference.generate import generate_images, write_samples
    from mmdsweep.utils import to_uint8

    torch.manual_seed(0)
    net = torch.jit.script(
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 7, stride=5),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(3),
            torch.nn.Flatten(),
        ).eval()
    )

    class Tiny(FeatureSpace):
        def __init__(self) -> None:
            super().__init__("tiny-inception", 72, 299, value_range=(0.0, 255.0))
            self.net = net

        def embed(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    cfg_exp = load_experiment(tiny_root / "tiny.yaml")
    model = comp.resolve_model_source(cfg_exp).model_dir
    gen_dir = write_samples(model, tmp_path / "gen/", 3, num=40, seed=3, batch_size=40)
    real, _ = comp.role_dataset(cfg_exp, "heldout")
    real_x = torch.stack([real[i][0] for i in range(60)])
    (tmp_path / "real").mkdir()
    for i, img in enumerate(to_uint8(real_x)):
        Image.fromarray(img[..., 0]).save(tmp_path / "real" / f"{i:06d}.png")

    def extractor(batch: torch.Tensor) -> torch.Tensor:
        return net(batch)

    theirs = cfid.compute_fid(
        str(gen_dir),
        str(tmp_path / "real"),
        mode="clean",
        custom_feat_extractor=extractor,
        num_workers=0,
        batch_size=20,
        device=torch.device("cpu"),
        verbose=False,
    )
    space = EvalSpace(Tiny())
    images = generate_images(model, 3, num=40, seed=3, batch_size=40)
    assert images is not None
    with torch.no_grad():
        ours = M.fid(space(images).double().numpy(), space(real_x).double().numpy())
    # clean-fid keeps the feature means in float32 (np.mean of float32 features): ~1e-7 relative in mu
    assert abs(ours - theirs) <= 1e-5 * abs(theirs), (ours, theirs)
    assert np.isfinite(ours) and ours > 0
