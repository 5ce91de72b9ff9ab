"""Output directories (issue 10, fault 4, part 3): writable, not another experiment's, restartable.

Before: ``output.dir`` under a regular file passed ``--dry-run`` then died with NotADirectoryError;
``--resume`` on another experiment's sweep directory rewrote its files and started pretraining; a
sweep whose first start died after caching but before Tune saved state could never start again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config

from mmdsweep import tune
from mmdsweep.config import load_experiment


def _write(tmp: Path, cfg: dict) -> Path:
    p = tmp / "exp.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _snapshot(d: Path) -> dict[str, tuple[int, bytes]]:
    return {str(f): (f.stat().st_mtime_ns, f.read_bytes()) for f in d.rglob("*") if f.is_file()}


@pytest.mark.parametrize("dry_run", [True, False])
def test_output_dir_under_a_regular_file(
    tmp_path: Path, dry_run: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "results"
    blocker.write_text("not a directory")
    cfg = tiny_config(tmp_path)
    cfg["output"]["dir"] = str(blocker / "deeper")
    rc = tune.main([str(_write(tmp_path, cfg)), "--quiet", *(["--dry-run"] if dry_run else [])])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert "output.dir:" in lines[0] and f"the regular file {blocker}" in lines[0]
    assert blocker.read_text() == "not a directory"
    assert not (tmp_path / "cache").exists()


def _foreign_sweep(sdir: Path, name: str, steps: int) -> None:
    """A sweep directory as another experiment left it (with Tune state, so it is resumable)."""
    other = tiny_config(sdir.parent)
    other["name"] = name
    other["finetune"]["steps"] = steps
    sdir.mkdir(parents=True)
    (sdir / "experiment.yaml").write_text(yaml.safe_dump(other))
    (sdir / "sweep.json").write_text(
        json.dumps({"sweep_id": f"{name}-1", "experiment_name": name, "layout_version": 2})
    )
    (sdir / "ray" / "sweep").mkdir(parents=True)
    (sdir / "ray" / "sweep" / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")


@pytest.mark.parametrize(
    ("name", "steps", "message"),
    [
        ("other", 4, "holds a sweep of experiment 'other', not 'tiny'"),
        ("tiny", 9, "with other settings (finetune.steps: 9 -> 4)"),
    ],
)
def test_resume_refuses_another_experiments_sweep(
    tmp_path: Path, name: str, steps: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(tmp_path)
    sdir = Path(cfg["output"]["dir"]) / cfg["output"]["name"]
    _foreign_sweep(sdir, name, steps)
    before = _snapshot(sdir)
    p = _write(tmp_path, cfg)
    for args in ([str(p), "--resume", "--quiet"], [str(p), "--dry-run"]):
        rc = tune.main(args)
        err = capsys.readouterr().err
        assert rc == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], err
    assert _snapshot(sdir) == before  # nothing rewritten
    assert not (tmp_path / "cache").exists()  # no pretraining started


class _Stop(Exception):
    pass


def test_first_start_died_before_tune_state_restarts_cleanly(
    tiny_yaml: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rule: no Tune experiment state -> the sweep starts afresh, with or without --resume, caches kept."""
    from mmdsweep.sweep import raytrain

    def die(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt  # the first start is killed after caching, before Tune saved state

    monkeypatch.setattr(raytrain, "init_ray", die)
    assert tune.main([str(tiny_yaml), "--quiet"]) == 130
    exp = load_experiment(tiny_yaml)
    sdir = tune.sweep_dir(exp)
    assert (sdir / "sweep.json").is_file() and not tune._tune_state_exists(exp)
    capsys.readouterr()

    def reached(*_a: object, **_k: object) -> None:
        raise _Stop  # the restart got past every check: it would start Ray now

    monkeypatch.setattr(raytrain, "init_ray", reached)
    for args in ([str(tiny_yaml), "--quiet"], [str(tiny_yaml), "--quiet", "--resume"]):
        with pytest.raises(_Stop):
            tune.main(args)
    err = capsys.readouterr().err
    assert "already holds a sweep" not in err and "no Tune experiment state" not in err
    meta = json.loads((sdir / "sweep.json").read_text())
    assert meta["experiment_name"] == "tiny" and meta.get("restarted_from")
