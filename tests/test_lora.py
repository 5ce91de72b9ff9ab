"""``finetune.adapter: lora``: peft adapters, adapter-only checkpoints, merge at export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from scale_fixture import tiny_experiment, tiny_setup

from mmdsweep.assets.adapters import merge_adapter_if_any
from mmdsweep.assets.models import save_denoiser
from mmdsweep.core.sampling import select_timesteps
from mmdsweep.train import adapters
from mmdsweep.train.loop import (
    RunState,
    kernel_spec,
    load_training_state,
    mmd_step,
    prepare_model,
    save_checkpoint,
)

LORA = {"finetune.adapter": "lora", "finetune.lora.rank": 4, "finetune.lora.alpha": 8.0}


def _lora_setup(**extra: object):
    exp = tiny_experiment(**{**LORA, **extra})  # type: ignore[arg-type]
    setup = tiny_setup(exp, attention=True)
    model, eps = prepare_model(setup, setup.denoiser.unet)
    return exp, setup, model, eps


def _randomise_adapter(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _out(unet: torch.nn.Module) -> torch.Tensor:
    x = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(x, torch.tensor([5, 400, 900])).sample  # type: ignore[no-any-return]


def test_only_adapter_parameters_train() -> None:
    exp, setup, model, eps = _lora_setup()
    trainable, total = adapters.count_trainable(model)
    assert 0 < trainable < total / 5
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    # conv1/conv2 of the ResNets and the attention projections are adapted
    assert any(".conv1." in n for n in names) and any("to_q" in n for n in names)
    loss, _ = mmd_step(setup, eps, 0, select_timesteps(3, 1000), kernel_spec(exp), 16)
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    assert any(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if p.grad is not None)


def test_lora_layer_is_w_plus_scaled_ba() -> None:
    """Our LoRA is peft's: a Linear target computes W x + b + (alpha / r) B A x (Hu et al. 2021, Eq. 3)."""
    _, _, model, _ = _lora_setup()
    _randomise_adapter(model)
    layer = next(m for n, m in model.named_modules() if n.endswith("to_q") and hasattr(m, "lora_A"))
    base = layer.get_base_layer()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(5, base.in_features)
    expected = base(x) + (8.0 / 4) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_initial_adapter_is_the_pretrained_model() -> None:
    exp = tiny_experiment()
    plain = _out(tiny_setup(exp, attention=True).denoiser.unet)
    _, _, model, _ = _lora_setup()
    torch.testing.assert_close(_out(model), plain, rtol=0, atol=0)


def test_checkpoint_holds_only_the_adapter_and_resumes_and_exports(tmp_path: Path) -> None:
    from diffusers import UNet2DModel

    from mmdsweep.inference.export import export_pipeline

    exp = tiny_experiment(**LORA)  # type: ignore[arg-type]
    setup = tiny_setup(exp, attention=True)
    base_dir = tmp_path / "base"
    save_denoiser(base_dir, setup.denoiser.unet, setup.denoiser.scheduler_config)
    model, _ = prepare_model(setup, setup.denoiser.unet)
    _randomise_adapter(model)
    expected = _out(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(
        ckpt,
        model,
        None,
        opt,
        setup.denoiser.scheduler_config,
        RunState(step=3),
        exp,
        base_model=str(base_dir),
    )
    assert not (ckpt / "unet").exists()
    files = {p.name for p in (ckpt / "adapter").iterdir()}
    assert files == {"adapter_model.safetensors", "adapter_config.json"}
    assert json.loads((ckpt / "state.json").read_text())["base_model"] == str(base_dir)

    # resume: a fresh adapter model gets the saved weights back
    _, _, fresh, _ = _lora_setup()
    opt2 = torch.optim.Adam([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    state = load_training_state(ckpt, fresh, None, opt2)
    assert state.step == 3
    torch.testing.assert_close(_out(fresh), expected, rtol=0, atol=0)

    # export merges into plain diffusers weights; merged output == adapter output
    den = merge_adapter_if_any(ckpt)
    assert den is not None and type(den.unet) is UNet2DModel
    torch.testing.assert_close(_out(den.unet), expected, rtol=1e-5, atol=1e-5)
    out = export_pipeline(ckpt, tmp_path / "export")
    loaded = UNet2DModel.from_pretrained(out / "unet")
    torch.testing.assert_close(_out(loaded), expected, rtol=1e-5, atol=1e-5)
    assert not any("lora" in k for k in loaded.state_dict())

    # sampling, `mmdsweep.evaluate` and the sweep's final protocol load models through one loader: it merges
    # the adapter too, so a LoRA checkpoint samples the fine-tuned chain (not the base model) everywhere
    from mmdsweep.inference.generate import generate_images, load_model

    torch.testing.assert_close(_out(load_model(str(ckpt)).unet), expected, rtol=1e-5, atol=1e-5)
    from_ckpt = generate_images(str(ckpt), 2, num=3, seed=7, batch_size=3)
    from_export = generate_images(str(out), 2, num=3, seed=7, batch_size=3)
    from_base = generate_images(str(base_dir), 2, num=3, seed=7, batch_size=3)
    assert from_ckpt is not None and from_export is not None and from_base is not None
    torch.testing.assert_close(from_ckpt, from_export, rtol=0, atol=1e-5)
    assert float((from_ckpt - from_base).abs().max()) > 1e-3


def test_full_weight_checkpoints_are_not_touched(tmp_path: Path) -> None:
    assert merge_adapter_if_any(tmp_path) is None


def test_unknown_target_modules_are_refused() -> None:
    with pytest.raises(ValueError, match="target_modules"):
        _lora_setup(**{"finetune.lora.target_modules": ["nope"]})
