"""Module roles read off flax (linen, nnx) and equinox parameter names, for the plan.

A pytree keeps no module types, so the roles come from what the libraries write into the
names: flax linen's automatic names (`Dense_3`, `Embed_0`, `LayerNorm_1`), the leaves of a
module (`embedding`, `kernel`, `scale`), and the order of the last layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from muon_core import name_kind
from muon_core._architectures import components

AUTO_NAME = re.compile(r"^([A-Za-z]+)_(\d+)$")
AUTO_KINDS = {"Embed": "embedding", "LayerNorm": "norm", "RMSNorm": "norm", "BatchNorm": "norm",
              "GroupNorm": "norm", "InstanceNorm": "norm", "Dense": "hidden",
              "DenseGeneral": "hidden", "Conv": "hidden", "ConvTranspose": "hidden",
              "Einsum": "hidden"}
WEIGHT_LEAVES = ("kernel", "weight")


def _auto_kind(parts: list[str]) -> str | None:
    match = AUTO_NAME.match(parts[-2]) if len(parts) > 1 else None
    return AUTO_KINDS.get(match.group(1)) if match else None


def _output_layer(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """The weight of the last top-level dense layer: linen's highest `Dense_N` directly under
    the root, or the last layer of a top-level sequence (`layers.N`, nnx and equinox)."""
    best: tuple[int, str] | None = None
    for name, shape in shapes.items():
        parts = components(name)
        if len(shape) != 2 or parts[-1] not in WEIGHT_LEAVES:
            continue
        index = None
        if len(parts) == 2 and (match := AUTO_NAME.match(parts[0])) and match.group(1) == "Dense":
            index = int(match.group(2))
        elif len(parts) == 3 and parts[1].isdigit():
            index = int(parts[1])
        if index is not None and (best is None or index > best[0]):
            best = (index, name)
    return best[1] if best else None


def module_kinds(shapes: Mapping[str, Sequence[int]]) -> dict[str, str]:
    """Map leaf names to "embedding", "head", "norm" or "hidden" where the names say so.

    `Embed` tables (`embedding` leaves) are embeddings; the last top-level dense layer is the
    head (the one whose output is the logits, as torch's last `nn.Linear`); layers with
    linen's automatic names take their type's kind unless a head or embedding name in the
    path (`muon_core.name_kind`) says otherwise, which the plan then reads.
    """
    head = _output_layer(shapes)
    kinds = {}
    for name in shapes:
        parts = components(name)
        if parts[-1] == "embedding":
            kinds[name] = "embedding"
        elif name == head:
            kinds[name] = "head"
        elif name_kind(name) is None and (kind := _auto_kind(parts)) is not None:
            kinds[name] = kind
    return kinds
