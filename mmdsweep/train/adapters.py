"""Parameter-efficient fine-tuning: LoRA adapters on the UNet through ``peft`` (``finetune.adapter: lora``).

LoRA (Hu et al. 2021, arXiv:2106.09685) replaces a frozen weight W by W + (alpha / r) B A with
A: r x in, B: out x r trainable and B = 0 at the start, so the fine-tuned chain starts exactly
at the pretrained one. We do not re-implement the layers: ``peft.get_peft_model`` wraps the
diffusers ``UNet2DModel`` (Linear layers of attention, ``to_q/to_k/to_v/to_out.0``, and the
ResNet ``conv1/conv2`` Conv2d layers by default, ``finetune.lora.target_modules``).

On disk, a LoRA checkpoint holds only the adapter (``adapter/adapter_model.safetensors`` and
``adapter/adapter_config.json``, peft's own format), the scheduler config and the training
state; ``state.json`` names the base model directory. :func:`merge_adapter_if_any` folds the
adapter into plain diffusers weights (``merge_and_unload``) so that exports load as a normal
``UNet2DModel``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmdsweep.assets.adapters import ADAPTER_DIR, BASE_MODEL_KEY, merge_adapter_if_any

__all__ = [
    "ADAPTER_DIR",
    "BASE_MODEL_KEY",
    "adapter_state",
    "apply_lora",
    "count_trainable",
    "is_adapter",
    "load_adapter",
    "lora_config",
    "merge_adapter_if_any",
    "merged_unet",
    "save_adapter",
    "set_adapter_state",
]


def lora_config(settings: dict[str, Any]) -> Any:
    """A ``peft.LoraConfig`` from ``finetune.lora`` (rank, alpha, dropout, target_modules)."""
    import peft

    return peft.LoraConfig(
        r=int(settings["rank"]),
        lora_alpha=float(settings["alpha"]),  # type: ignore[arg-type]  # peft annotates int, uses a float scale
        lora_dropout=float(settings["dropout"]),
        target_modules=list(settings["target_modules"]),
        init_lora_weights=True,
    )


def apply_lora(unet: torch.nn.Module, settings: Any) -> torch.nn.Module:
    """Wrap ``unet`` in a peft model whose only trainable parameters are the LoRA adapters.

    ``settings``: the ``finetune.lora`` section (or a mapping of its keys). Target names that the
    architecture lacks are ignored (the digits UNet has no attention);
    if none matches, peft's own error is re-raised with the names that exist.
    """
    import dataclasses

    import peft

    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        settings = dataclasses.asdict(settings)  # a LoraConfig section
    present = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules()} | {
        ".".join(n.split(".")[-2:]) for n, _ in unet.named_modules()
    }
    targets = [t for t in settings["target_modules"] if t in present]
    if not targets:
        raise ValueError(
            f"finetune.lora.target_modules: none of {settings['target_modules']} is a module of this UNet "
            "(try conv1, conv2, to_q, to_k, to_v, to_out.0)"
        )
    model = peft.get_peft_model(unet, lora_config({**settings, "target_modules": targets}))  # type: ignore[arg-type]
    return model


def is_adapter(model: torch.nn.Module) -> bool:
    try:
        import peft
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, peft.PeftModel)


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def save_adapter(directory: Path, model: torch.nn.Module) -> Path:
    """Write the adapter weights (safetensors) and config to ``directory/adapter``."""
    out = directory / ADAPTER_DIR
    model.save_pretrained(str(out), safe_serialization=True)  # type: ignore[operator]
    readme = out / "README.md"  # peft writes a model card template; it says nothing about this run
    if readme.is_file():
        readme.unlink()
    return out


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights only (peft's key names, as in ``adapter_model.safetensors``)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)  # type: ignore[no-any-return]


def load_adapter(directory: Path, model: torch.nn.Module) -> None:
    """Load ``directory/adapter`` into the (already wrapped) peft ``model`` in place."""
    from safetensors.torch import load_file

    set_adapter_state(model, load_file(str(directory / ADAPTER_DIR / "adapter_model.safetensors")))


def set_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights (from :func:`adapter_state`) into the peft ``model``; mismatches raise."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter does not match the model: unexpected keys {unexpected[:3]}")


def merged_unet(model: torch.nn.Module) -> torch.nn.Module:
    """A plain ``UNet2DModel`` with the adapter folded in (a copy; ``model`` is left as it is)."""
    import copy

    return copy.deepcopy(model).merge_and_unload()  # type: ignore[operator,no-any-return]
