"""QK-clip for torch: record each attention layer's largest logit per head in `forward`, then
rescale the query and key weights in place after `opt.step()` (see `muon_core.qk_clip`)."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import muon_core
import torch


@torch.no_grad()
def record_qk_max(store: MutableMapping[str, torch.Tensor], name: str, q: torch.Tensor,
                  k: torch.Tensor, scale: float | None = None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Record the largest pre-softmax logit of each query head into `store[name]` (the
    running maximum over calls, e.g. micro-batches) and return this call's values.

    Call it in `forward` with the attention's `q` `(..., heads, queries, dim)` and `k`
    `(..., kv_heads, keys, dim)` (as `scaled_dot_product_attention` takes them), its `scale`
    (default `1/sqrt(dim)`) and boolean `mask` (True where a query may attend). `name` is the
    attention module's name, a prefix of its query and key parameters' names. The logits are
    computed again without gradient: one extra batched matmul per layer.
    """
    s_max = muon_core.max_logits(q.detach(), k.detach(), scale=scale, mask=mask)
    s_max = s_max.to(torch.float32)
    store[name] = s_max if name not in store else torch.maximum(store[name], s_max)
    return s_max


@torch.no_grad()
def qk_clip(params: Mapping[str, torch.Tensor], qk_max: Mapping[str, Any], plan: muon_core.Plan,
            config: muon_core.MuonConfig) -> None:
    """Rescale `params` (by name, torch layout) in place by `muon_core.qk_clip_scales`;
    non-finite logits raise ValueError before anything changes."""
    qk_max = {layer: torch.as_tensor(s) for layer, s in qk_max.items()}
    scales = muon_core.qk_clip_scales(plan, qk_max, config, layout="out_in")
    for name, scale in scales.items():
        param = params[name]
        param.mul_(scale.to(device=param.device, dtype=param.dtype))
