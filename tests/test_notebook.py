"""Executes notebooks/analyze_sweep.ipynb top to bottom on a synthetic sweep (nbclient)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from sweep_fixture import BEST_PER_T, TRIALS, build_sweep

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "analyze_sweep.ipynb"


def _outputs(nb: Any, tag: str) -> list[Any]:
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"no single cell tagged {tag!r}"
    return list(cells[0].get("outputs", []))


def _data(outputs: list[Any], mime: str) -> str:
    found = [o["data"][mime] for o in outputs if "data" in o and mime in o["data"]]
    assert found, f"no {mime} output among {[o.get('output_type') for o in outputs]}"
    return str(found[-1])


def test_committed_notebook_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_on_synthetic_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = build_sweep(tmp_path, optuna=True)
    monkeypatch.setenv("MMDSWEEP_RESULTS", str(results))
    monkeypatch.setenv("MMDSWEEP_NUM_SAMPLES", "16")
    monkeypatch.setenv("MMDSWEEP_DEVICE", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models on a busy machine
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors

    assert "sweep-fixture" in _data(_outputs(nb, "load"), "text/plain")
    leaderboard = _data(_outputs(nb, "leaderboard"), "text/html")
    assert leaderboard.count("<tr>") >= len(TRIALS)  # header + one row per trial
    assert leaderboard.index("t06") < leaderboard.index("t03") < leaderboard.index("t00")
    best = _data(_outputs(nb, "best-per-t"), "text/html")
    assert all(tid in best for tid in BEST_PER_T.values())
    final = _data(
        _outputs(nb, "final"), "text/html"
    )  # sweep_fixture.FINAL_FIDS: t00 better, t03 within noise
    assert final.count("<tr") == 1 + 4  # header + (2 spaces x 2 T)
    assert "t00" in final and "ddim/leading" in final and "better" in final and "within noise" in final
    for tag in ("pareto", "curves", "sensitivity-plot", "samples"):
        assert len(_data(_outputs(nb, tag), "image/png")) > 1000, tag
    pareto_time = _outputs(nb, "pareto-time")
    assert _data(pareto_time, "image/png") and "t03" in _data(pareto_time, "text/html")
    assert "optuna-fanova" in "".join(o.get("text", "") for o in _outputs(nb, "sensitivity-plot"))
    duck = _data(_outputs(nb, "duckdb"), "text/html")
    assert all(tid in duck for tid, t in TRIALS.items() if t[-1]) and "t05" not in duck
    assert _data(_outputs(nb, "duckdb-check"), "text/plain") == str(sum(1 for t in TRIALS.values() if t[-1]))


@pytest.mark.slow
def test_notebook_runs_on_a_real_sweep(tiny_sweep: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The notebook against a sweep that mmdsweep.tune really ran (shared session fixture)."""
    from mmdsweep.results import read_trials

    sdir, _ = tiny_sweep
    monkeypatch.setenv("MMDSWEEP_RESULTS", str(sdir))
    monkeypatch.setenv("MMDSWEEP_NUM_SAMPLES", "16")
    monkeypatch.setenv("MMDSWEEP_DEVICE", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    trials = read_trials(sdir)
    leaderboard = _data(_outputs(nb, "leaderboard"), "text/html")
    assert all(tid in leaderboard for tid in trials["trial_id"])
    for tag in ("pareto", "curves", "samples"):
        assert len(_data(_outputs(nb, tag), "image/png")) > 1000, tag
    finished = trials["best_fid"].notna().sum()
    assert _data(_outputs(nb, "duckdb-check"), "text/plain") == str(finished)
