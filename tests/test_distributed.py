"""Tests for mmdsweep.train.distributed, with real 2-process gloo groups."""

from __future__ import annotations

import datetime
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmdsweep.train import distributed as d

WORLD = 2
BATCH = 8  # global batch, split evenly over the ranks


def _model() -> torch.nn.Module:
    """A small model with identical initial weights in every process."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Global input batch and a fixed reference set."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, generator=g), torch.randn(5, 2, generator=g)


def _mmd_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Unbiased-MMD-style pairwise loss: within-set similarity minus cross similarity."""
    kxx = torch.exp(-torch.cdist(x, x).pow(2))
    n = x.shape[0]
    within = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    cross = torch.exp(-torch.cdist(x, ref).pow(2)).mean()
    return within - 2 * cross


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def _check_gradients(rank: int, out: dict[str, Any]) -> None:
    """Gathered-batch loss + average_gradients on this rank."""
    model = _model()
    x, ref = _data()
    per = BATCH // WORLD
    local = model(x[rank * per : (rank + 1) * per])
    gathered = d.all_gather_with_grad(local)
    out["gathered"] = gathered.detach().clone()
    loss = _mmd_like(gathered, ref)
    loss.backward()
    out["raw_grads"] = _grads(model)
    # A frozen parameter (no grad) must be skipped, not crash.
    frozen = torch.nn.Linear(1, 1)
    frozen.weight.requires_grad_(False)
    d.average_gradients(frozen)
    d.average_gradients(model)
    out["grads"] = _grads(model)
    out["loss"] = loss.item()


def _check_collectives(rank: int, out: dict[str, Any]) -> None:
    """Metrics, in-place means, broadcast and print0 on this rank."""
    out["rank"], out["world"], out["is_main"] = d.get_rank(), d.get_world_size(), d.is_main()
    out["metrics"] = d.all_reduce_metrics({"loss": float(rank + 1), "acc": 10.0 * rank})
    out["nan"] = d.all_reduce_metrics({"loss": float("nan") if rank == 1 else 1.0, "ok": 2.0})
    out["inf"] = d.all_reduce_metrics({"loss": float("inf") if rank == 0 else 1.0})
    try:
        d.all_reduce_metrics({"a": 1.0} if rank == 0 else {"b": 1.0})
        out["mismatch"] = None
    except ValueError as exc:
        out["mismatch"] = str(exc)
    t32 = torch.full((3, 2), float(rank))
    t64 = torch.tensor([float(rank) * 4], dtype=torch.float64)
    d.all_reduce_mean_([t32, t64])
    single = torch.tensor([float(rank)])
    d.all_reduce_mean_(single)
    out["means"] = (t32, t64, single)
    out["bcast"] = d.broadcast_object({"from": rank, "items": [rank] * 3}, src=1)
    d.print0(f"hello from rank {rank}")


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """Entry point of each spawned process: run the checks and save what they saw."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    out: dict[str, Any] = {}
    _check_gradients(rank, out)
    _check_collectives(rank, out)
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()  # nobody tears the FileStore down while a peer still uses it
    dist.destroy_process_group()
    # Skip interpreter finalisation: gloo's C++ threads occasionally abort the process
    # there ("terminate called without an active exception", seen ~1 in 20 runs under
    # pytest), after all work is done. Exit code 0 tells spawn() that this rank succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Results of running all checks in a 2-process gloo group (spawned once per module)."""
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single_process_grads() -> tuple[list[torch.Tensor], torch.Tensor, float]:
    model = _model()
    x, ref = _data()
    out = model(x)
    loss = _mmd_like(out, ref)
    loss.backward()
    return _grads(model), out.detach(), loss.item()


def test_defaults_without_process_group(capsys: pytest.CaptureFixture[str]) -> None:
    assert not d.is_initialized()
    assert (d.get_rank(), d.get_world_size(), d.is_main()) == (0, 1, True)
    d.print0("visible")
    assert capsys.readouterr().out == "visible\n"
    t = torch.randn(3, 2, requires_grad=True)
    assert d.all_gather_with_grad(t) is t
    before = t.detach().clone()
    d.all_reduce_mean_([t])
    assert torch.equal(t.detach(), before)
    assert d.all_reduce_metrics({"b": 2, "a": float("nan")})["b"] == 2.0
    assert math.isnan(d.all_reduce_metrics({"a": float("nan")})["a"])
    obj = {"x": 1}
    assert d.broadcast_object(obj) is obj
    model = _model()
    model(torch.randn(2, 3)).sum().backward()
    g = _grads(model)
    d.average_gradients(model)
    assert all(torch.equal(a, b) for a, b in zip(g, _grads(model)))


def test_gathered_batch_matches_single_process(ranks: list[dict[str, Any]]) -> None:
    _, full_out, full_loss = _single_process_grads()
    for r in ranks:
        torch.testing.assert_close(r["gathered"], full_out)
        assert r["loss"] == pytest.approx(full_loss, rel=1e-6)


def test_averaged_gradient_equals_single_process_gradient(ranks: list[dict[str, Any]]) -> None:
    full_grads, _, _ = _single_process_grads()
    for r in ranks:
        assert len(r["grads"]) == len(full_grads)
        for got, want in zip(r["grads"], full_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # Without averaging, each rank's gradient is world_size x its own share only:
    # the raw gradients differ from the full gradient and sum to world_size x it.
    for i, want in enumerate(full_grads):
        assert not torch.allclose(ranks[0]["raw_grads"][i], want, rtol=1e-4, atol=1e-6)
        total = sum(r["raw_grads"][i] for r in ranks)
        torch.testing.assert_close(total, WORLD * want, rtol=1e-5, atol=1e-7)


def test_rank_helpers_in_group(ranks: list[dict[str, Any]]) -> None:
    assert [(r["rank"], r["world"], r["is_main"]) for r in ranks] == [(0, 2, True), (1, 2, False)]


def test_all_reduce_metrics_mean_and_non_finite(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert r["metrics"] == {"acc": 5.0, "loss": 1.5}
        assert math.isnan(r["nan"]["loss"]) and r["nan"]["ok"] == 2.0
        assert r["inf"]["loss"] == math.inf
        assert r["mismatch"] is not None and "different metric names" in r["mismatch"]


def test_all_reduce_mean_inplace_and_broadcast(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        t32, t64, single = r["means"]
        assert t32.dtype == torch.float32 and torch.equal(t32, torch.full((3, 2), 0.5))
        assert t64.dtype == torch.float64 and t64.item() == 2.0
        assert single.item() == 0.5
        assert r["bcast"] == {"from": 1, "items": [1, 1, 1]}


def test_buckets_split_by_dtype_and_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(d, "_BUCKET_NUMEL", 10)
    ts = [torch.zeros(6), torch.zeros(6), torch.zeros(2, dtype=torch.float64), torch.zeros(4)]
    buckets = d._buckets(ts)
    assert [[t.numel() for t in b] for b in buckets] == [[6], [6, 4], [2]]
