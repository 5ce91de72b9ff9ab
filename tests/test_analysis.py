"""Tests of the analysis API (mmdsweep.analysis) and sampling-speed tables (mmdsweep.inference.speed)."""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image
from sweep_fixture import BASE_SPEED, BEST_PER_T, EXPORT_SPEED, FINAL_FIDS, FINAL_N, TRIALS, build_sweep

from mmdsweep import analysis as A
from mmdsweep.assets.models import load_denoiser
from mmdsweep.core.sampling import ChainSpec, select_timesteps
from mmdsweep.inference import speed as S
from mmdsweep.inference.generate import generate

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread per module


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sweep(tmp_path_factory.mktemp("analysis"), optuna=True)


@pytest.fixture(scope="module")
def sweep(results_dir: Path) -> A.Sweep:
    return A.load_sweep(results_dir)


def _png_ok(fig: Figure) -> np.ndarray:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    img = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"), dtype=float)
    assert img.std() > 5, "figure renders as a blank image"
    return img


# --------------------------------------------------------------------------- loading


def test_load_sweep(sweep: A.Sweep, results_dir: Path) -> None:
    assert sweep.dir == results_dir
    assert sweep.sweep_ids == ["sweep-fixture"]
    assert len(sweep.trials) == len(TRIALS)
    assert len(sweep.metrics) == sum(len(t[-1]) for t in TRIALS.values())
    assert set(sweep.speed["sweep_id"]) == {"sweep-fixture"}
    assert len(sweep.speed) == len(BASE_SPEED) + len(EXPORT_SPEED)
    assert sweep.meta["experiment_name"] == "digits_mmd"
    assert sweep.param_types["kernel.type"] == "str"
    assert "param.kernel.type" in sweep.param_columns
    assert "9 trials" in repr(sweep)
    dirs = A.model_dirs(results_dir)
    assert list(dirs) == ["base", "T5", "T10"]
    assert dirs["T5"] == str(results_dir / "exported" / "T5")


def test_load_sweep_errors_and_several(tmp_path: Path, results_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="trials.parquet"):
        A.load_sweep(tmp_path)
    with pytest.raises(ValueError, match="loaded twice"):
        A.load_sweep([results_dir, results_dir])
    other = build_sweep(tmp_path / "b", sweep_id="sweep-b", models=False, speed=False)
    both = A.load_sweep([results_dir, other])
    assert both.sweep_ids == ["sweep-fixture", "sweep-b"]
    assert len(both.trials) == 2 * len(TRIALS)
    assert set(both.trials["sweep_id"]) == {"sweep-fixture", "sweep-b"}
    assert set(both.metrics["sweep_id"]) == {"sweep-fixture", "sweep-b"}
    lb = A.leaderboard(both)
    assert lb.columns[0] == "sweep_id" and lb["rank"].iloc[:2].tolist() == [1, 2]
    best = A.best_per_t(both)
    assert len(best) == 2 * len(BEST_PER_T)
    # the second sweep has no speed rows and no exports
    b = best[best["sweep_id"] == "sweep-b"]
    assert b["seconds_per_image"].isna().all() and b["export_dir"].isna().all()
    con = A.duckdb_connect(both)
    counts = dict(con.sql("select sweep_id, count(*) from trials group by all").fetchall())
    assert counts == {"sweep-fixture": len(TRIALS), "sweep-b": len(TRIALS)}
    assert "speed" in {r[0] for r in con.sql("show tables").fetchall()}


def test_sweep_json_missing_falls_back_to_parquet_metadata(tmp_path: Path) -> None:
    d = build_sweep(tmp_path, sweep_id="meta-only", models=False, speed=False)
    (d / "sweep.json").unlink()
    s = A.load_sweep(d)
    assert s.meta["sweep_id"] == "meta-only"
    assert s.meta["experiment_name"] == "digits_mmd"
    assert s.meta["exports"] == {} and s.speed.empty
    assert A.baseline_fid(s).empty
    assert A.sensitivity(s).attrs["method"] == "summary"


# --------------------------------------------------------------------------- tables


def test_summary(sweep: A.Sweep) -> None:
    row = A.summary(sweep).iloc[0]
    assert row["trials"] == 9 and row["evaluated"] == 8
    assert row["n_completed"] == 5 and row["n_errored"] == 1 and row["n_diverged"] == 1
    assert row["best_fid"] == 21.0 and row["best_trial"] == "t06" and row["best_timesteps"] == 20
    assert row["trial_wall_time_s"] == pytest.approx(sweep.trials["wall_time_s"].sum())


def test_leaderboard(sweep: A.Sweep) -> None:
    lb = A.leaderboard(sweep)
    assert lb["trial_id"].tolist()[:3] == ["t06", "t07", "t03"]
    assert lb["rank"].tolist()[:8] == list(range(1, 9))
    # the errored trial has no FID: last, without a rank
    assert lb["trial_id"].iloc[-1] == "t05" and pd.isna(lb["rank"].iloc[-1])
    assert lb["best_fid"].iloc[:8].is_monotonic_increasing
    assert lb.loc[lb["trial_id"] == "t00", "seconds_per_image"].item() == EXPORT_SPEED[5]
    assert "param.finetune.lr" in lb.columns
    per_t = A.leaderboard(sweep, per_t=True, top=1)
    assert dict(zip(per_t["timesteps"], per_t["trial_id"])) == BEST_PER_T
    assert per_t["rank"].tolist() == [1, 1, 1]
    by_kid = A.leaderboard(sweep, by="final_fid", ascending=False, top=1)
    assert by_kid["trial_id"].item() == "t02"
    with pytest.raises(KeyError, match="no column"):
        A.leaderboard(sweep, by="nope")


def test_best_per_t(sweep: A.Sweep, results_dir: Path) -> None:
    best = A.best_per_t(sweep)
    assert dict(zip(best["timesteps"], best["trial_id"])) == BEST_PER_T
    assert best["best_fid"].tolist() == [45.0, 29.0, 21.0]
    assert best["base_fid"].tolist() == [60.0, 41.0, 30.0]
    assert best["fid_improvement"].tolist() == [15.0, 12.0, 9.0]
    # export speed preferred over the base model's; T=20 has no export, so the base speed
    assert best["seconds_per_image"].tolist() == [EXPORT_SPEED[5], EXPORT_SPEED[10], BASE_SPEED[20]]
    assert best["export_dir"].tolist()[:2] == [str(results_dir / "exported" / f"T{t}") for t in (5, 10)]
    assert pd.isna(best["export_dir"].iloc[2])


def test_baseline_fid_sources(sweep: A.Sweep) -> None:
    s = A.Sweep(**{**sweep.__dict__, "metas": {"sweep-fixture": {**sweep.meta, "baseline": {}}}})
    assert A.baseline_fid(s).empty
    step0 = sweep.metrics[sweep.metrics["step"] == 100].assign(step=0, fid=lambda d: d["fid"] + 10)
    s.metrics = pd.concat([sweep.metrics, step0], ignore_index=True)
    base = A.baseline_fid(s)
    assert set(base["source"]) == {"step 0"}
    # median over the trials of each T of their step-0 FID
    assert base.set_index("timesteps")["base_fid"].to_dict() == {5: 66.5, 10: 47.0, 20: 35.5}
    s.metrics = s.metrics.assign(fid_before=lambda d: d["timesteps"].astype(float) * 7)
    assert A.baseline_fid(s).set_index("timesteps")["base_fid"].to_dict() == {5: 35.0, 10: 70.0, 20: 140.0}


def test_pareto_front_known_answer() -> None:
    df = pd.DataFrame(
        {
            "name": ["a", "b", "c", "d", "e", "f", "g"],
            "x": [1.0, 1.0, 2.0, 3.0, 3.0, 4.0, np.nan],
            "y": [5.0, 6.0, 3.0, 3.0, 1.0, 1.0, 0.0],
        }
    )
    front = A.pareto_front(df, x="x", y="y")
    # b: same x as a, worse y; d: same y as c, more x; f: same y as e, more x; g: no x
    assert front["name"].tolist() == ["a", "c", "e"]
    dup = pd.DataFrame({"x": [1, 1, 2], "y": [2, 2, 3]})
    assert len(A.pareto_front(dup, x="x", y="y")) == 2
    assert A.pareto_front(df.iloc[:0], x="x", y="y").empty
    with pytest.raises(KeyError):
        A.pareto_front(df, x="z", y="y")


def test_pareto_front_of_sweep(sweep: A.Sweep) -> None:
    for x in ("timesteps", "seconds_per_image"):
        front = A.pareto_front(sweep, x=x)
        assert front["trial_id"].tolist() == ["t00", "t03", "t06"]
    assert A.pareto_front(sweep, x="seconds_per_image")["seconds_per_image"].tolist() == [0.004, 0.009, 0.020]


def test_speed_per_t_prefers_latest_and_sampler(sweep: A.Sweep) -> None:
    later = sweep.speed[sweep.speed["model"] == "T5"].assign(
        seconds_per_image=0.1, measured_at=pd.Timestamp("2030-01-01", tz="UTC")
    )
    other = later.assign(sampler="dpmpp_2m", seconds_per_image=9.0)
    s = A.Sweep(**{**sweep.__dict__, "speed": pd.concat([sweep.speed, later, other], ignore_index=True)})
    sp = A.speed_per_t(s).set_index("timesteps")
    assert sp.loc[5, "seconds_per_image"] == 0.1 and sp.loc[5, "speed_model"] == "T5"
    assert sp.loc[50, "speed_model"] == "base"


# --------------------------------------------------------------------------- plots


def test_learning_curves(sweep: A.Sweep) -> None:
    fig = A.learning_curves(sweep)
    ax = fig.axes[0]
    evaluated = sum(1 for t in TRIALS.values() if t[-1])
    trial_lines = [ln for ln in ax.get_lines() if ln.get_marker() == "o"]
    assert len(trial_lines) == evaluated
    crosses = [ln for ln in ax.get_lines() if ln.get_marker() == "x"]
    assert len(crosses) == 1  # the diverged trial (the errored one has no evaluation)
    assert len([ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]) == 3  # base FID per T
    leg = ax.get_legend()
    assert leg is not None
    legend = [t.get_text() for t in leg.get_texts()]
    assert legend[:3] == ["T=5", "T=10", "T=20"] and "base model (before)" in legend
    # lines of one T share a colour, different T differ
    assert len({str(ln.get_color()) for ln in trial_lines}) == 3
    _png_ok(fig)
    empty = A.learning_curves(A.Sweep(**{**sweep.__dict__, "metrics": sweep.metrics.iloc[:0]}))
    assert "no fid evaluations" in empty.axes[0].texts[0].get_text()


def test_plot_pareto(sweep: A.Sweep) -> None:
    for x in ("timesteps", "seconds_per_image"):
        fig = A.plot_pareto(sweep, x=x)
        ax = fig.axes[0]
        assert "3 Pareto-optimal of 8 trials" in ax.get_title()
        leg = ax.get_legend()
        assert leg is not None
        labels = [t.get_text() for t in leg.get_texts()]
        assert "Pareto front" in labels and "base model (before)" in labels
        _png_ok(fig)
    no_speed = A.Sweep(**{**sweep.__dict__, "speed": sweep.speed.iloc[:0]})
    with pytest.raises(ValueError, match=r"python -m mmdsweep\.speed"):
        A.plot_pareto(no_speed, x="seconds_per_image")


# --------------------------------------------------------------------------- sensitivity


def test_sensitivity_summary(sweep: A.Sweep) -> None:
    sens = A.sensitivity(sweep, method="summary")
    assert list(sens.columns) == A.SENSITIVITY_COLUMNS
    assert sens.attrs["method"] == "summary"
    scored = sweep.trials.dropna(subset=["best_fid"])
    lr = sens[sens["parameter"] == "finetune.lr"].iloc[0]
    assert lr["method"] == "spearman" and lr["n"] == 8
    manual = np.corrcoef(scored["param.finetune.lr"].rank(), scored["best_fid"].rank())[0, 1]
    assert lr["spearman"] == pytest.approx(manual) and lr["importance"] == pytest.approx(abs(manual))
    t = sens[sens["parameter"] == "sampler.timesteps"].iloc[0]
    assert t["spearman"] < -0.9  # more steps, lower FID
    assert sens["parameter"].iloc[0] == "sampler.timesteps"  # the most important one first
    kernel = sens[sens["parameter"] == "kernel.type"].set_index("category")
    assert set(kernel.index) == {"rbf", "imq", "polynomial"}
    assert kernel.loc["rbf", "n"] == 4
    assert kernel.loc["polynomial", "mean_best_fid"] == pytest.approx((47.0 + 35.0) / 2)
    assert kernel.loc["imq", "min_best_fid"] == 21.0
    assert 0 <= kernel["importance"].iloc[0] <= 1
    bw = sens[sens["parameter"] == "kernel.bandwidth"].iloc[0]
    assert bw["n"] == 5  # null for trials where the branch did not sample it
    fig = A.plot_sensitivity(sens)
    assert len(fig.axes) == 2
    _png_ok(fig)


def test_sensitivity_optuna(sweep: A.Sweep) -> None:
    sens = A.sensitivity(sweep)
    assert sens.attrs["method"] == "optuna-fanova"
    assert set(sens["method"]) == {"optuna-fanova"}
    assert set(sens["parameter"]) == {"finetune.lr", "kernel.type", "sampler.timesteps"}
    assert sens["importance"].sum() == pytest.approx(1.0, abs=1e-6)
    assert sens["parameter"].iloc[0] == "sampler.timesteps"
    fig = A.plot_sensitivity(sens)
    assert len(fig.axes) == 1
    _png_ok(fig)


def test_sensitivity_falls_back_without_storage(tmp_path: Path, results_dir: Path) -> None:
    d = tmp_path / "copy"
    shutil.copytree(results_dir, d, ignore=shutil.ignore_patterns("exported", "checkpoints", "optuna.db"))
    meta = json.loads((d / "sweep.json").read_text())
    meta["optuna_storage"] = "sqlite:///does-not-exist.db"
    (d / "sweep.json").write_text(json.dumps(meta))
    sens = A.sensitivity(A.load_sweep(d))
    assert sens.attrs["method"] == "summary"
    assert "not found" in sens.attrs["note"]
    assert not (d / "does-not-exist.db").exists() and not Path("does-not-exist.db").exists()
    with pytest.raises(FileNotFoundError):
        A.sensitivity(A.load_sweep(d), method="optuna")


# --------------------------------------------------------------------------- duckdb


def test_duckdb_paths(sweep: A.Sweep) -> None:
    paths = A.duckdb_paths(sweep)
    assert {"trials", "metrics", "speed"} <= set(paths)
    rel = duckdb.sql(
        f"select trial_id, timesteps, min(fid) as best from '{paths['metrics']}' group by all order by best"
    )
    assert rel is not None
    best = rel.df()
    expected = sweep.trials.dropna(subset=["best_fid"]).set_index("trial_id")["best_fid"]
    assert best.set_index("trial_id")["best"].to_dict() == expected.to_dict()
    count = duckdb.sql(f"select count(*) from '{paths['speed']}'")
    assert count is not None and count.fetchall() == [(len(sweep.speed),)]


# --------------------------------------------------------------------------- samples


def test_sample_grid_uses_evaluation_noise(results_dir: Path) -> None:
    base = str(results_dir.parent / "models" / "base")
    x = A.sample_grid(base, 5, num=6, seed=3, batch_size=4)
    assert x.shape == (6, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    den = load_denoiser(base)
    ref, _ = generate(
        den.eps_fn(),
        den.schedule,
        ChainSpec(sampler="ddim", timesteps=5, spacing="leading", clip_sample=den.schedule.clip_sample),
        num=6,
        shape=(3, 16, 16),
        seed=3,
        batch_size=6,
        device=torch.device("cpu"),
    )
    assert ref is not None
    torch.testing.assert_close(x, ref, atol=1e-4, rtol=1e-4)  # batches of 4 vs 6
    tuned = A.sample_grid(results_dir / "exported" / "T5", 5, num=6, seed=3)
    assert not torch.allclose(tuned, x, atol=1e-3)  # another model, same noise
    assert select_timesteps(5, den.schedule.num_train_timesteps) == [800, 600, 400, 200, 0]


def test_before_after_grids(sweep: A.Sweep) -> None:
    pairs = A.before_after_grids(sweep, num=4)
    assert [p.timesteps for p in pairs] == [5, 10]
    p5 = pairs[0]
    assert p5.base is not None and p5.base.shape == p5.tuned.shape == (4, 3, 16, 16)
    assert p5.tuned_fid == 45.0 and p5.base_fid == 60.0 and p5.trial_id == "t00"
    assert not torch.allclose(p5.base, p5.tuned)
    fig = A.plot_sample_grids(pairs)
    titles = [ax.get_title() for ax in fig.axes]
    assert "base, ddim T=5\nFID 60.00" in titles
    assert "fine-tuned, ddim T=10\nFID 29.00, trial t03" in titles
    _png_ok(fig)
    grid = A.grid_array(p5.tuned, pad=1)
    assert grid.shape == (2 * 17 + 1, 2 * 17 + 1, 3) and grid.dtype == np.uint8


# --------------------------------------------------------------------------- speed


def test_measure_sampling_speed_grows_with_t(results_dir: Path, tmp_path: Path) -> None:
    base = results_dir.parent / "models" / "base"
    df = S.measure_sampling_speed(base, (5, 50), batch_size=4, num_images=4, device="cpu", warmup=1)
    assert df["timesteps"].tolist() == [5, 50]
    assert list(df.columns) == S.SPEED_SCHEMA.names
    assert (df["model"] == "base").all() and (df["device"] == "cpu").all()
    t5, t50 = df["seconds_per_image"].tolist()
    assert t5 > 0 and t50 / t5 > 2, (t5, t50)
    # round trip through speed.parquet (merge replaces rows with the same key)
    S.write_speed_table(tmp_path, df, sweep_id="s1")
    back = S.read_speed_table(tmp_path)
    pd.testing.assert_frame_equal(back, df, check_exact=False)
    meta = pq.read_schema(tmp_path / S.SPEED_FILE).metadata
    assert meta[b"mmdsweep.table"] == b"speed" and meta[b"mmdsweep.sweep_id"] == b"s1"
    newer = df.iloc[:1].assign(seconds_per_image=1.0, measured_at=dt.datetime.now(dt.timezone.utc))
    other = df.iloc[:1].assign(model="T5")
    S.write_speed_table(tmp_path, pd.concat([newer, other]))
    merged = S.read_speed_table(tmp_path)
    assert len(merged) == 3
    assert merged.set_index(["model", "timesteps"]).loc[("base", 5), "seconds_per_image"] == 1.0
    assert pq.read_schema(tmp_path / S.SPEED_FILE).metadata[b"mmdsweep.sweep_id"] == b"s1"
    S.write_speed_table(tmp_path, other, merge=False)
    assert len(S.read_speed_table(tmp_path)) == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_speed_table_validation(tmp_path: Path) -> None:
    assert S.read_speed_table(tmp_path).empty
    with pytest.raises(ValueError, match="required"):
        S.write_speed_table(tmp_path, pd.DataFrame({"model": ["x"]}))
    with pytest.raises(ValueError, match="sampler"):
        S.measure_sampling_speed("unused", sampler="euler")


def test_measure_sweep_speed_cli(
    results_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "sweep"
    shutil.copytree(results_dir, d, ignore=shutil.ignore_patterns("checkpoints", "optuna.db", "report"))
    (d / S.SPEED_FILE).unlink()
    rc = S.main([str(d), "--timesteps", "2", "--batch-size", "2", "--num-images", "2", "--device", "cpu"])
    assert rc == 0
    df = S.read_speed_table(d)
    got = sorted(zip(df["model"], df["timesteps"]))
    assert got == [("T10", 10), ("T5", 5), ("base", 2), ("base", 5), ("base", 10)]
    assert "wrote" in capsys.readouterr().out
    assert S.main([str(tmp_path / "nope")]) == 2
    assert math.isfinite(float(df["seconds_per_image"].max()))


def test_empty_sweep_just_started(tmp_path: Path) -> None:
    """The files the results callback writes before the first trial: every view works, empty."""
    from mmdsweep.analysis import report
    from mmdsweep.results import METRICS_SCHEMA, atomic_write_table, file_metadata, trials_schema

    types = {"finetune.lr": "float"}
    meta = file_metadata("trials", "e1", "exp", types)
    atomic_write_table(trials_schema(types).with_metadata(meta).empty_table(), tmp_path / "trials.parquet")
    atomic_write_table(METRICS_SCHEMA.with_metadata(meta).empty_table(), tmp_path / "metrics.parquet")
    s = A.load_sweep(tmp_path)
    assert s.sweep_ids == ["e1"] and s.trials.empty
    assert A.leaderboard(s).empty and A.best_per_t(s).empty and A.pareto_front(s).empty
    assert A.sensitivity(s).empty and A.summary(s)["trials"].item() == 0
    assert "no fid evaluations" in A.learning_curves(s).axes[0].texts[0].get_text()
    assert "no trials" in A.plot_pareto(s).axes[0].texts[0].get_text()
    html = report.build_report(tmp_path, samples=False).read_text()
    assert "section failed" not in html and "no rows" in html


# --------------------------------------------------------------------------- final protocol


def test_final_table_known_numbers(sweep: A.Sweep) -> None:
    """evaluation.parquet of the fixture (FINAL_FIDS): means, stds, best baseline, gain, 2-std flag."""
    assert len(sweep.evaluation) == sum(len(v) for v in FINAL_FIDS.values())
    assert set(sweep.evaluation["sweep_id"]) == {"sweep-fixture"}
    ft = A.final_table(sweep)
    assert ft.columns.tolist() == A.FINAL_TABLE_COLUMNS
    # every space, the primary (features.eval: the config default, classifier) first
    assert list(zip(ft["space"], ft["timesteps"], ft["trial_id"])) == [
        ("classifier", 5, "t00"),
        ("classifier", 10, "t03"),
        ("inception", 5, "t00"),
        ("inception", 10, "t03"),
    ]
    assert ft["primary"].tolist() == [True, True, False, False]
    assert ft["fid_mean"].tolist() == pytest.approx([1.0, 1.9, 11.0, 20.5])
    assert ft["fid_std"].tolist() == pytest.approx([0.1, 0.3, 1.0, 0.5])
    assert ft["best_baseline"].tolist() == [
        "ddim/leading",
        "dpmpp_2m/trailing",
        "ddim/leading",
        "unipc/trailing",
    ]
    assert ft["baseline_fid_mean"].tolist() == pytest.approx([2.0, 2.0, 10.5, 31.0])
    assert ft["gain"].tolist() == pytest.approx([1.0, 0.1, -0.5, 10.5])
    assert ft["beyond_2std"].tolist() == [True, False, False, True]
    assert ft["verdict"].tolist() == ["better", "within noise", "within noise", "better"]
    assert ft["selection_fid"].tolist() == [45.0, 29.0, 45.0, 29.0] and set(ft["train"]) == {"weights"}
    assert ft["k"].tolist() == [3] * 4 and set(ft["num_samples"]) == {FINAL_N}
    assert "FID biased" in ft["warnings"].iloc[2] and ft["warnings"].iloc[0] == ""
    assert A.final_table(sweep, space="inception")["trial_id"].tolist() == ["t00", "t03"]
    base = A.baselines_table(sweep)
    assert base.columns.tolist() == A.BASELINES_COLUMNS and len(base) == 8
    c5 = base[(base["space"] == "classifier") & (base["timesteps"] == 5)]
    assert c5[["rank", "sampler", "spacing"]].values.tolist() == [
        [1, "ddim", "leading"],
        [2, "unipc", "trailing"],
    ]
    assert c5["fid_mean"].tolist() == pytest.approx([2.0, 3.1]) and c5["fid_std"].tolist() == pytest.approx(
        [0.1, 0.1]
    )
    assert base["space"].tolist()[:4] == ["classifier"] * 4
    assert len(A.baselines_table(sweep, space="inception")) == 4


def test_leaderboard_and_best_per_t_carry_the_final_numbers(sweep: A.Sweep) -> None:
    lb = A.leaderboard(sweep).set_index("trial_id")
    assert lb.loc["t00", "final_fid_mean"] == pytest.approx(1.0) and lb.loc[
        "t00", "final_fid_std"
    ] == pytest.approx(0.1)
    assert lb.loc["t03", "final_fid_mean"] == pytest.approx(1.9)
    assert lb.drop(index=["t00", "t03"])["final_fid_mean"].isna().all()  # not final-scored
    best = A.best_per_t(sweep).set_index("timesteps")
    assert (
        best.loc[5, "final_fid_mean"] == pytest.approx(1.0) and best.loc[5, "best_baseline"] == "ddim/leading"
    )
    assert best.loc[5, "baseline_fid_mean"] == pytest.approx(2.0) and best.loc[
        5, "baseline_fid_std"
    ] == pytest.approx(0.1)
    assert best.loc[5, "gain"] == pytest.approx(1.0) and best.loc[5, "beyond_2std"] == True  # noqa: E712
    assert best.loc[10, "gain"] == pytest.approx(0.1) and best.loc[10, "beyond_2std"] == False  # noqa: E712
    assert math.isnan(best.loc[20, "final_fid_mean"]) and math.isnan(best.loc[20, "gain"])


def test_sweep_without_evaluation_parquet(tmp_path: Path, results_dir: Path) -> None:
    d = build_sweep(tmp_path / "noeval", sweep_id="no-eval", models=False, speed=False, evaluation=False)
    s = A.load_sweep(d)
    assert s.evaluation.empty and {"sweep_id", "kind", "fid", "space", "seed"} <= set(s.evaluation.columns)
    assert A.final_table(s).empty and A.final_table(s).columns.tolist() == A.FINAL_TABLE_COLUMNS
    assert A.baselines_table(s).empty
    assert A.leaderboard(s)["final_fid_mean"].isna().all() and A.best_per_t(s)["gain"].isna().all()
    both = A.load_sweep([results_dir, d])  # concatenated with sweep_id; the sweep without one adds nothing
    assert set(both.evaluation["sweep_id"]) == {"sweep-fixture"}
    assert set(A.final_table(both)["sweep_id"]) == {"sweep-fixture"}


def test_unknown_evaluation_version_is_refused(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from mmdsweep.results.evaluation import evaluation_schema

    d = build_sweep(tmp_path / "v99", sweep_id="v99", models=False, speed=False, evaluation=False)
    schema = evaluation_schema().with_metadata({b"mmdsweep.evaluation_schema_version": b"99"})
    pq.write_table(schema.empty_table(), d / "evaluation.parquet")
    with pytest.raises(ValueError, match="evaluation schema version 99"):
        A.load_sweep(d)
