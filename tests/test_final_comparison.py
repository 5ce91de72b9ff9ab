"""The final-protocol tables of evaluation.parquet (mmdsweep.results.evaluation, torch-free): mean +- std
over seeds, the best baseline per T and space, the gain and whether it exceeds 2 std, the version check."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest


def _final_rows(spec: dict[tuple[str, int, str, str], list[float]]) -> list[dict[str, Any]]:
    """evaluation.parquet rows: (space, T, kind, trial id or sampler/spacing) -> FID per seed (1, 2, ...)."""
    from sweep_fixture import evaluation_rows

    return evaluation_rows(
        spec,
        num_samples=32,
        base_dir="base",
        model_dir="ckpt",
        kid=lambda fid: fid / 100,
        preprocessing=lambda space: f"{space} 8->32",
        warnings=lambda space, kind: "N small" if (space == "inception" and kind == "baseline") else "",
    )


def test_final_comparison_known_numbers(tmp_path: Path) -> None:
    """1.0 +- 0.1 vs 2.0 +- 0.1 is beyond 2 std; 1.9 +- 0.3 vs 2.0 +- 0.1 is not; every space, primary first."""
    from mmdsweep.results.evaluation import final_comparison, read_evaluation, write_evaluation

    rows = _final_rows(
        {
            ("classifier", 5, "model", "a"): [0.9, 1.0, 1.1],
            ("classifier", 5, "model", "b"): [1.6, 1.9, 2.2],
            ("classifier", 5, "baseline", "ddim/leading"): [1.9, 2.0, 2.1],
            ("classifier", 5, "baseline", "unipc/trailing"): [2.4, 2.5, 2.6],
            ("classifier", 10, "model", "c"): [3.0, 3.0, 3.0],  # std 0, no baseline at T=10
            # seeds shared with the baseline move both FIDs together: unpaired within noise, paired beyond
            ("classifier", 20, "model", "d"): [2.1, 1.0, 0.95],
            ("classifier", 20, "baseline", "unipc/leading"): [2.2, 1.08, 1.05],
            ("inception", 5, "model", "a"): [12.0, 13.0, 14.0],
            ("inception", 5, "baseline", "ddim/leading"): [9.0, 9.5, 10.0],
            ("inception", 5, "baseline", "unipc/trailing"): [8.0, 8.1, 8.2],
        }
    )
    rows.append({**rows[0], "protocol": "selection", "fid": 100.0})  # another protocol: ignored
    write_evaluation(rows, tmp_path / "evaluation.parquet", append=False)
    df = read_evaluation(tmp_path)  # a sweep directory, or the file itself
    assert len(df) == len(rows) and len(read_evaluation(tmp_path / "evaluation.parquet")) == len(rows)
    comp = final_comparison(df, "inception")
    assert comp["space"].tolist() == ["inception", "classifier", "classifier", "classifier", "classifier"]
    assert comp["primary"].tolist() == [True, False, False, False, False]
    comp = final_comparison(rows, "classifier").set_index(["space", "timesteps", "trial_id"])
    a = comp.loc[("classifier", 5, "a")]
    assert a["fid_mean"] == pytest.approx(1.0) and a["fid_std"] == pytest.approx(0.1)
    assert a["best_baseline"] == "ddim/leading" and a["baseline_fid_mean"] == pytest.approx(2.0)
    assert a["baseline_fid_std"] == pytest.approx(0.1) and a["gain"] == pytest.approx(1.0)
    # the same gain (1.0) on every seed: paired std 0, beyond; the unpaired std is kept for reference
    assert a["paired"] and a["diff_std"] == pytest.approx(0.0, abs=1e-12)
    assert (
        a["diff_std_unpaired"] == pytest.approx(math.sqrt(0.02))
        and a["beyond_2std"]
        and a["verdict"] == "better"
    )
    assert a["k"] == 3 and a["num_samples"] == 32 and a["reference"] == "digits:heldout"
    assert a["kid_mean"] == pytest.approx(0.01) and a["preprocessing"] == "classifier 8->32"
    b = comp.loc[("classifier", 5, "b")]
    assert b["fid_mean"] == pytest.approx(1.9) and b["fid_std"] == pytest.approx(0.3)
    assert b["gain"] == pytest.approx(0.1) and not b["beyond_2std"] and b["verdict"] == "within noise"
    assert b["diff_std"] == pytest.approx(0.2)  # per-seed differences 0.3, 0.1, -0.1
    d = comp.loc[("classifier", 20, "d")]
    assert (
        d["gain"] == pytest.approx((0.1 + 0.08 + 0.1) / 3) and d["beyond_2std"] and d["verdict"] == "better"
    )
    assert d["diff_std_unpaired"] > 0.8 and 2 * d["diff_std_unpaired"] > d["gain"]  # unpaired: within noise
    c = comp.loc[("classifier", 10, "c")]
    assert (
        pd.isna(c["best_baseline"]) and math.isnan(c["gain"]) and not c["beyond_2std"] and c["verdict"] == ""
    )
    ia = comp.loc[("inception", 5, "a")]
    assert ia["best_baseline"] == "unipc/trailing" and ia["gain"] == pytest.approx(8.1 - 13.0)
    assert ia["beyond_2std"] and ia["verdict"] == "worse" and ia["warnings"] == "N small"
    # the rows of one seed only: no std, never "beyond 2 std" of an unknown spread
    one = final_comparison([r for r in rows if r["seed"] == 1], "classifier")
    assert one["fid_std"].isna().all() and not one["beyond_2std"].any()
    empty = final_comparison([], "classifier")
    assert empty.empty and "beyond_2std" in empty.columns and isinstance(empty, pd.DataFrame)


def test_read_evaluation_refuses_unknown_versions(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmdsweep.results.evaluation import evaluation_schema, read_evaluation

    path = tmp_path / "evaluation.parquet"
    schema = evaluation_schema().with_metadata({b"mmdsweep.evaluation_schema_version": b"99"})
    pq.write_table(schema.empty_table(), path)
    with pytest.raises(
        ValueError,
        match=r"evaluation\.parquet: evaluation schema version 99 is unknown.*reads version\(s\) 1",
    ):
        read_evaluation(path)
    pq.write_table(pa.table({"fid": [1.0]}), path)
    with pytest.raises(ValueError, match="none recorded"):
        read_evaluation(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_evaluation(tmp_path / "nope")


def test_protocol_reexports_the_results_module() -> None:
    from mmdsweep.results import evaluation as R
    from mmdsweep.train import protocol as P

    for name in (
        "evaluation_schema",
        "write_evaluation",
        "summarize",
        "best_baselines",
        "gain_vs_best_baseline",
    ):
        assert getattr(P, name) is getattr(R, name)
    assert P.EVALUATION_FILE == R.EVALUATION_FILE == "evaluation.parquet"
    assert P.EVALUATION_SCHEMA_VERSION == R.EVALUATION_SCHEMA_VERSION
