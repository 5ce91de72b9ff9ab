"""The sweep CLI: dry runs of every experiment, and real end-to-end sweeps on a small Ray.

The end-to-end tests run the real fine-tuning loop inside Ray Train inside Ray Tune (Optuna
search, ASHA early stopping) on a tiny digits experiment, and guard the product's promises: every
trial lands in ``trials.parquet`` exactly once with the right status, a diverging trial does not
stop the sweep, a SIGKILLed driver resumes without losing completed results, and a trial's workers
spread over the nodes of a multi-node cluster.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import yaml
from conftest import sweep_yaml

from mmdsweep import tune
from mmdsweep.results import read_metrics, read_trials

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["cifar10", "celeba", "lsun"])
def test_real_experiments_dry_run_report_missing_files(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = tune.main([str(ROOT / "experiments" / f"{name}.yaml"), "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 2, err  # config, search space and resources are valid; only files are missing
    assert "Traceback" not in out + err
    assert "file(s) missing" in err
    assert "data.root:" in err and "does not exist" in err
    assert "inception-2015-12-05.pt" in err
    assert "model.path:" in err
    assert "data: MISSING" in out


def test_digits_dry_run_passes(capsys: pytest.CaptureFixture[str]) -> None:
    rc = tune.main([str(ROOT / "experiments" / "digits.yaml"), "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert re.search(r"search: \d+ parameters", out), out
    assert "features: torchvision:mobilenet_v2: ok" in out


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"finetune.lrr": {"loguniform": [1e-5, 1e-3]}}, "search.space.finetune.lrr: not a config key"),
        (
            {"finetune.lr": {"loguniform": [0, 1e-3]}},
            "search.space.finetune.lr: loguniform needs 0 < low < high",
        ),
        (
            {"features.train": {"choice": ["classifier", "vgg"]}},
            "search.space.features.train: value 'vgg' is invalid",
        ),
        ({}, "search.space: must be a non-empty mapping"),
    ],
)
def test_bad_search_space_fails_before_work(
    tmp_path: Path, space: dict, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import tiny_config

    cfg = tiny_config(tmp_path)
    cfg["search"]["space"] = space
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert tune.main([str(p)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_sweep_end_to_end_with_asha_and_a_diverging_trial(tiny_sweep: tuple[Path, str]) -> None:
    sdir, out = tiny_sweep
    trials = read_trials(sdir)
    assert len(trials) == 4 and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"completed", "early-stopped", "diverged"}
    lrs = trials.set_index("trial_id")["param.finetune.lr"]
    diverged = trials[trials["param.finetune.lr"] > 1e20]
    assert len(diverged) >= 1, lrs.to_dict()
    assert (diverged["status"] == "diverged").all()
    sane = trials[trials["param.finetune.lr"] < 1e20]
    assert len(sane) >= 1 and sane["best_fid"].notna().all()
    assert (sane["status"] != "diverged").all()
    # metrics: one row per report, readable by duckdb
    metrics = read_metrics(sdir)
    assert len(metrics) >= len(sane)
    n = duckdb.sql(f"select count(*) from '{sdir / 'metrics.parquet'}'").fetchall()[0][0]
    assert n == len(metrics)
    # the leaderboard and Pareto front were printed, exports load with plain diffusers
    assert "Leaderboard" in out and "Pareto front" in out and "trials.parquet" in out
    # a quiet, informative console: Tune's table names the searched parameters and the objective,
    # Ray's internal lines (raylet warnings, worker output, placement-group notes) stay hidden
    table = [line for line in out.splitlines() if "finetune.lr" in line and "status" in line.lower()]
    assert any("fid" in line for line in table), out[-3000:]  # the first table precedes any result
    assert "(raylet)" not in out and "(pid=" not in out, out[-3000:]
    meta = json.loads((sdir / "sweep.json").read_text())
    assert meta["exports"], meta
    assert meta["baseline"] and set(meta["baseline"]) <= {"2", "3"}
    from diffusers import DDIMPipeline

    for d in meta["exports"].values():
        pipe = DDIMPipeline.from_pretrained(sdir / d)
        assert pipe.unet.config.sample_size == 8
    speed = pd.read_parquet(sdir / "speed.parquet")
    assert {5, 50} <= set(speed["timesteps"])


def _completed(sdir: Path) -> pd.DataFrame:
    try:
        t = read_trials(sdir)
    except (FileNotFoundError, OSError, ValueError):
        return pd.DataFrame()
    return t[t["status"] == "completed"]


@pytest.mark.slow
def test_trial_workers_span_two_nodes(tiny_root: Path, tmp_path: Path) -> None:
    """``mmdsweep.tune`` connects to an existing (two-node) cluster and spreads a trial's workers."""
    import ray
    from ray.cluster_utils import Cluster

    from mmdsweep.config import load_experiment

    p = sweep_yaml(
        tiny_root,
        tmp_path,
        num_samples=1,
        scheduler="fifo",
        space={"finetune.lr": {"loguniform": [1.0e-5, 1.0e-4]}},
    )
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 150 * 1024 * 1024},
    )
    cluster.add_node(num_cpus=1, object_store_memory=150 * 1024 * 1024)
    try:
        exp = load_experiment(
            p,
            {
                "resources.address": cluster.address,
                "resources.num_workers": 2,
                "resources.cpus_per_worker": 0.75,
                "resources.trial_cpus": 0.25,
                "finetune.steps": 2,
            },
        )
        meta = tune.run(exp, verbose=0)
        metrics = read_metrics(tune.sweep_dir(exp))
        assert meta["sweep_id"]
        trials = read_trials(tune.sweep_dir(exp))
        assert list(trials["status"]) == ["completed"]
        raw = [json.loads(line) for line in _result_lines(tune.sweep_dir(exp))]
        assert raw and all(r["world_size"] == 2 for r in raw)
        assert all(r["num_nodes"] == 2 for r in raw), raw
        assert len(metrics) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()


def _result_lines(sdir: Path) -> list[str]:
    lines: list[str] = []
    for f in (sdir / "ray").rglob("result.json"):
        lines += [line for line in f.read_text().splitlines() if line.strip()]
    return lines


# ----------------------------------------------------------------------------- final table (no Ray)


def _eval_rows(spec: dict[tuple[str, int, str, str], list[float]]) -> list[dict[str, object]]:
    from sweep_fixture import evaluation_rows

    return evaluation_rows(
        spec,
        num_samples=16,
        base_dir="base",
        model_dir="ckpt",
        kid=lambda fid: 0.0,
        preprocessing=lambda space: None,
        warnings=lambda space, kind: "N=16 is small" if space == "inception" else "",
    )


def _trials(**cols: list[object]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "trial_id": ["a", "b", "c", "d", "e"],
            "timesteps": [5, 5, 5, 10, 10],
            "best_fid": [3.0, 2.0, 2.5, 4.0, None],
            "best_checkpoint": ["/c/a", "/c/b", "/c/c", "/c/d", "/c/e"],
            **cols,
        }
    )


def test_final_candidates_best_per_t_and_train_mode() -> None:
    trials = _trials(**{"param.finetune.train": ["timesteps", "weights", "both", "timesteps", "weights"]})
    got = [
        (c.timesteps, c.train, c.trial_id, c.selection_fid, c.exported)
        for c in tune.final_candidates(trials, "weights")
    ]
    # T=5: the best trial is b (weights, exported); a and c are the best of their modes; T=10: e has no FID
    assert got == [
        (5, "both", "c", 2.5, False),
        (5, "timesteps", "a", 3.0, False),
        (5, "weights", "b", 2.0, True),
        (10, "timesteps", "d", 4.0, True),
    ]
    plain = tune.final_candidates(_trials(), "weights")  # finetune.train not searched: one mode
    assert [(c.timesteps, c.train, c.trial_id, c.exported) for c in plain] == [
        (5, "weights", "b", True),
        (10, "weights", "d", True),
    ]


def test_final_evaluation_entries_and_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """final_evaluation on hand-made final-protocol rows: one entry per (space, T, mode), primary first,
    known means/stds/gains; format_final_table prints each space under its heading with the verdicts."""
    from types import SimpleNamespace

    from mmdsweep.config import from_dict
    from mmdsweep.inference import generate
    from mmdsweep.results.evaluation import read_evaluation, write_evaluation

    spec = {
        ("classifier", 5, "model", "b"): [0.9, 1.0, 1.1],  # 1.0 +- 0.1 vs 2.0 +- 0.1: better, > 2 std
        ("classifier", 5, "model", "a"): [1.6, 1.9, 2.2],  # 1.9 +- 0.3: within 2 std
        ("classifier", 5, "baseline", "ddim/leading"): [1.9, 2.0, 2.1],
        ("classifier", 5, "baseline", "unipc/trailing"): [2.9, 3.0, 3.1],
        ("inception", 5, "model", "b"): [12.9, 13.0, 13.1],  # worse than 10.0 +- 0.1, > 2 std
        ("inception", 5, "model", "a"): [9.0, 9.5, 10.0],
        ("inception", 5, "baseline", "ddim/leading"): [9.9, 10.0, 10.1],
        ("classifier", 0, "real", "real/"): [0.7, 0.8, 0.9],  # the floor: real training images
    }
    rows = _eval_rows(spec)
    ev = SimpleNamespace(
        build_final_evaluator=lambda exp, channels, device: "evaluator",
        final_rows_for_model=lambda exp, ckpt, evaluator, trial_id, device: [
            r for r in rows if r["kind"] == "model" and r["trial_id"] == trial_id
        ],
        baseline_rows=lambda exp, base, ts, evaluator: [
            r for r in rows if r["kind"] == "baseline" and r["timesteps"] in ts
        ],
        real_floor_rows=lambda exp, evaluator, channels: [r for r in rows if r["kind"] == "real"],
        write_evaluation=write_evaluation,
    )
    monkeypatch.setattr(
        generate, "prepare_model", lambda d, device: (SimpleNamespace(channels=1), None, None, None)
    )
    exp = from_dict(
        {"features": {"eval": "classifier", "extra_eval": ["inception"]}, "finetune": {"device": "cpu"}}
    )
    cands = [
        tune.FinalCandidate(5, "weights", "b", 20.0, str(tmp_path / "T5"), True),
        tune.FinalCandidate(5, "timesteps", "a", 21.0, str(tmp_path / "T5-timesteps"), False),
    ]
    final = tune.final_evaluation(exp, tmp_path, {"base_model_dir": "base"}, cands, ev)
    assert len(read_evaluation(tmp_path)) == len(rows)
    assert [(e["space"], e["trial_id"], e["train"], e["exported"]) for e in final] == [
        ("classifier", "b", "weights", True),
        ("classifier", "a", "timesteps", False),
        ("inception", "b", "weights", True),
        ("inception", "a", "timesteps", False),
    ]
    b, a, ib, ia = final
    assert b["fid_mean"] == pytest.approx(1.0) and b["fid_std"] == pytest.approx(0.1) and b["k"] == 3
    assert b["best_baseline"] == "ddim/leading" and b["baseline_fid_mean"] == pytest.approx(2.0)
    assert b["gain"] == pytest.approx(1.0) and b["beyond_2std"] and b["selection_fid"] == 20.0
    assert a["fid_std"] == pytest.approx(0.3) and a["gain"] == pytest.approx(0.1) and not a["beyond_2std"]
    assert ib["gain"] == pytest.approx(-3.0) and ib["beyond_2std"] and not ia["beyond_2std"]
    keys = {"T", "trial_id", "selection_fid", "fid_mean", "fid_std", "k", "num_samples", "reference", "space"}
    keys |= {"warnings", "best_baseline", "baseline_fid_mean", "baseline_fid_std", "gain", "diff_std"}
    assert keys | {"beyond_2std", "train", "exported"} <= set(b)
    text = tune.format_final_table(final)
    lines = text.splitlines()
    assert lines[0].startswith("space classifier (primary") and "space inception" in lines
    proto = [i for i, ln in enumerate(lines) if ln.startswith("final protocol:")]
    assert (
        len(proto) == 2
        and "space classifier" in lines[proto[0]]
        and proto[0] < lines.index("space inception")
    )
    assert re.search(
        r"^\s+5\s+weights\*\s+20\.000\s+1\.000 \+- 0\.100\s+ddim/leading\s+2\.000 \+- 0\.100\s+better by 1\.000 \(> 2 x 0\.000\)$",
        text,
        re.M,
    )
    assert re.search(
        r"^\s+5\s+timesteps\s+21\.000\s+1\.900 \+- 0\.300 .*within noise \(gain \+0\.100, not > 2 x 0\.200\)",
        text,
        re.M,
    )
    assert "worse by 3.000 (> 2 x 0.000)" in text
    # the floor line under the classifier rows only (no real rows for inception)
    floor = [ln for ln in lines if "real data" in ln]
    assert len(floor) == 1 and "0.800 +- 0.100" in floor[0] and lines.index(floor[0]) < proto[0]
    assert b["floor_fid_mean"] == pytest.approx(0.8) and "floor_fid_mean" not in ib
    assert "final protocol: 3 fresh noise seeds x N=16, reference digits:heldout, space inception" in text
    assert "metric warning (inception): N=16 is small" in text
    assert tune.format_final_table([]) == "(no final evaluation)"
