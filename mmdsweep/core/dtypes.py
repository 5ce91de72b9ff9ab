"""The one map from a dtype string of the configuration to a ``torch.dtype`` (nanoGPT's ``ptdtype``).

``model.dtype`` and the speed CLI spell dtypes ``float32 | bfloat16 | float16``;
``finetune.precision`` spells them ``fp32 | bf16 | fp16``. Both resolve here.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""``model.dtype`` names -> torch dtypes."""

PRECISION_NAMES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""``finetune.precision`` names -> :data:`DTYPES` names."""


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"`` -> the torch dtype."""
    key = PRECISION_NAMES.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(DTYPES) + sorted(PRECISION_NAMES)}")
    return DTYPES[key]
