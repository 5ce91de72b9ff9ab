"""``finetune.compile``: the UNet inside the chain through ``torch.compile`` gives the eager results.

The default run uses the ``aot_eager`` backend: TorchDynamo captures the UNet's graph and
AOTAutograd builds its backward (what changes the semantics, if anything does), without
inductor's C++ code generation, which takes ~8 minutes for this tiny UNet on a shared 2-core CPU
(measured: 456 s for the first forward). ``MMDSWEEP_TEST_INDUCTOR=1`` runs the inductor check too.
"""

from __future__ import annotations

import os

import pytest
import torch
from scale_fixture import grads, rel_err, tiny_experiment, tiny_setup

from mmdsweep.core.sampling import select_timesteps
from mmdsweep.train.loop import compile_module, compile_unavailable, kernel_spec, mmd_step, prepare_model


def _step(compile_backend: str | None, monkeypatch: pytest.MonkeyPatch) -> tuple[float, dict, str]:
    if compile_backend:
        monkeypatch.setenv("MMDSWEEP_COMPILE_BACKEND", compile_backend)
    exp = tiny_experiment(**{"finetune.compile": bool(compile_backend), "finetune.batch_size": 4})
    setup = tiny_setup(exp)
    raw, eps = prepare_model(setup, setup.denoiser.unet)
    loss, _ = mmd_step(setup, eps, 0, select_timesteps(3, 1000), kernel_spec(exp), 8)
    return float(loss), grads(raw), ""


def test_compile_is_available_here() -> None:
    assert compile_unavailable() is None


def test_compiled_chain_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    loss_e, g_e, _ = _step(None, monkeypatch)
    loss_c, g_c, _ = _step("aot_eager", monkeypatch)
    # the same float32 ops in another order (AOTAutograd's decompositions): ~1e-6 relative
    assert abs(loss_c - loss_e) <= 1e-5 * abs(loss_e) + 1e-8
    assert rel_err(g_c, g_e) < 1e-4
    assert len(g_c) == len(g_e) > 10


def test_compile_module_wraps_and_shares_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    m = torch.nn.Linear(3, 3)
    c = compile_module(m, backend="aot_eager")
    assert c is not m and isinstance(c, torch._dynamo.eval_frame.OptimizedModule)
    assert list(c.parameters())[0] is m.weight
    x = torch.randn(2, 3)
    torch.testing.assert_close(c(x), m(x))


def test_unavailable_compile_falls_back_with_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mmdsweep.train.loop as loop

    monkeypatch.setattr(loop, "compile_unavailable", lambda: "torch.compile is not supported here (test)")
    m = torch.nn.Linear(2, 2)
    assert loop.compile_module(m) is m
    assert "running the UNet eagerly" in capsys.readouterr().err


@pytest.mark.skipif(
    os.environ.get("MMDSWEEP_TEST_INDUCTOR") != "1", reason="inductor takes ~8 min on 2 CPU cores"
)
def test_inductor_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    loss_e, g_e, _ = _step(None, monkeypatch)
    loss_c, g_c, _ = _step("inductor", monkeypatch)
    assert abs(loss_c - loss_e) <= 1e-4 * abs(loss_e) + 1e-7
    assert rel_err(g_c, g_e) < 1e-3
