"""What the module types of an `nn.Module` say about its parameters (for `Muon.for_model`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from torch import nn

from muon_core import name_kind, qkv_kind

EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
         nn.LocalResponseNorm)
HIDDEN = (nn.Linear, nn.modules.conv._ConvNd, nn.Bilinear)
# When a tensor is shared by several modules (tied weights), the first kind here wins.
PRIORITY = ("embedding", "head", "norm", "other", "hidden")
# Attribute names of attention modules (and their `config`) that give the head counts.
HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
KV_HEAD_COUNTS = ("num_kv_heads", "num_key_value_heads", "n_kv_heads", "multi_query_group_num")


class ModuleHints(NamedTuple):
    """What the modules say, per parameter name: kind, layout ("in_out" for GPT-2's Conv1D)
    and (query heads, key/value heads) of fused Q/K/V projections."""

    kinds: dict[str, str]
    layouts: dict[str, str] = {}
    heads: dict[str, tuple[int, int]] = {}

    def plan_keywords(self, names: Iterable[str]) -> dict[str, dict]:
        """`muon_core.plan` keywords restricted to `names`."""
        names = list(names)
        return {key: {n: table[n] for n in names if n in table}
                for key, table in (("module_kinds", self.kinds), ("layouts", self.layouts),
                                   ("heads", self.heads))}


def as_hints(module_kinds: Mapping[str, str] | ModuleHints | None) -> ModuleHints:
    """`ModuleHints` from what `Muon(module_kinds=...)` was given."""
    if isinstance(module_kinds, ModuleHints):
        return module_kinds
    return ModuleHints(dict(module_kinds or {}))


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's `Conv1D` (weight stored (in, out)), recognised without importing it."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, nn.Parameter)
            and weight.ndim == 2 and weight.shape[1] == getattr(module, "nf", None))


def _is_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            and module.groups == module.in_channels)


def _output_modules(model: nn.Module) -> set[int]:
    """Ids of the modules whose output is the logits: Hugging Face's `get_output_embeddings()`,
    else the last `nn.Linear` registered."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        head = getter()
        return {id(head)} if isinstance(head, nn.Module) else set()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return {id(linears[-1])} if linears else set()


def _kind(name: str, module: nn.Module, heads: set[int]) -> str | None:
    if isinstance(module, EMBEDDINGS):
        return "embedding"
    if id(module) in heads:
        return "head"
    if isinstance(module, NORMS):
        return "norm"
    if _is_depthwise(module):
        return None  # the plan sends depthwise kernels to AdamW by shape
    if isinstance(module, HIDDEN) or is_conv1d(module):
        by_name = name_kind(f"{name}.weight")
        return by_name[0] if by_name else "hidden"
    return None


def _count(module: nn.Module, keys: tuple[str, ...]) -> int | None:
    for source in (module, getattr(module, "config", None)):
        for key in keys:
            value = getattr(source, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _attention_heads(parent: nn.Module) -> tuple[int, int] | None:
    """(query heads, key/value heads) an attention module declares, else None."""
    n_q = _count(parent, HEAD_COUNTS)
    if n_q is None:
        return None
    if getattr(parent, "multi_query", False) and not getattr(parent, "new_decoder_architecture",
                                                             False):
        return n_q, 1  # Falcon-7B: one key/value head
    return n_q, _count(parent, KV_HEAD_COUNTS) or n_q


def model_hints(model: nn.Module) -> ModuleHints:
    """`module_kinds(model)` plus the layout of Conv1D weights and the head counts of fused
    Q/K/V projections whose attention module declares them."""
    heads = _output_modules(model)
    modules = dict(model.named_modules())
    kinds_by_id: dict[int, str] = {}
    layouts: dict[int, str] = {}
    qkv: dict[int, tuple[int, int]] = {}
    for name, module in modules.items():
        kind = _kind(name, module, heads)
        for param in module.parameters(recurse=False):
            if kind is not None:
                old = kinds_by_id.get(id(param), kind)
                kinds_by_id[id(param)] = min(old, kind, key=PRIORITY.index)
        weight = getattr(module, "weight", None)
        if is_conv1d(module):
            layouts[id(weight)] = "in_out"
        if isinstance(weight, nn.Parameter) and qkv_kind(f"{name}.weight"):
            counts = _attention_heads(modules.get(name.rpartition(".")[0], model))
            if counts is not None:
                qkv[id(weight)] = counts
    named = list(model.named_parameters())
    return ModuleHints({n: kinds_by_id[id(p)] for n, p in named if id(p) in kinds_by_id},
                       {n: layouts[id(p)] for n, p in named if id(p) in layouts},
                       {n: qkv[id(p)] for n, p in named if id(p) in qkv})


def module_kinds(model: nn.Module) -> dict[str, str]:
    """Map each parameter name (as `model.named_parameters()` gives it) to the kind of module
    that owns it: "embedding", "head" (the output projection: Hugging Face's
    `get_output_embeddings()`, else the last `nn.Linear` registered, or a Linear/Conv named like
    a head), "norm" or "hidden" (other Linear/Conv/Conv1D layers; one named like an embedding
    is "embedding"). Tied tensors take the strongest kind; parameters of other module types
    (and depthwise convolutions) are left to the plan's name and shape rules.
    """
    return model_hints(model).kinds


def sparse_parameters(model: nn.Module) -> set[int]:
    """Ids of parameters whose gradient will be sparse (embeddings built with `sparse=True`)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, EMBEDDINGS) and m.sparse}
