"""What the module types of an `nn.Module` say about its parameters (for `Muon.for_model`)."""

from __future__ import annotations

from torch import nn

EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
         nn.LocalResponseNorm)
HIDDEN = (nn.Linear, nn.modules.conv._ConvNd, nn.Bilinear)
# When a tensor is shared by several modules (tied weights), the first kind here wins.
PRIORITY = ("embedding", "head", "norm", "hidden")


def _kind(module: nn.Module, head: nn.Module | None) -> str | None:
    if isinstance(module, EMBEDDINGS):
        return "embedding"
    if module is head:
        return "head"
    if isinstance(module, NORMS):
        return "norm"
    if isinstance(module, HIDDEN):
        return "hidden"
    return None


def module_kinds(model: nn.Module) -> dict[str, str]:
    """Map each parameter name (as `model.named_parameters()` gives it) to the kind of module
    that owns it: "embedding", "head" (the last `nn.Linear` registered: the output projection),
    "norm" or "hidden" (other Linear/Conv layers). Tied tensors take the strongest kind;
    parameters of other module types are left to the plan's name and shape rules.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else None
    kinds_by_id: dict[int, str] = {}
    for module in model.modules():
        kind = _kind(module, head)
        if kind is None:
            continue
        for param in module.parameters(recurse=False):
            old = kinds_by_id.get(id(param), kind)
            kinds_by_id[id(param)] = min(old, kind, key=PRIORITY.index)
    return {name: kinds_by_id[id(p)] for name, p in model.named_parameters()
            if id(p) in kinds_by_id}


def sparse_parameters(model: nn.Module) -> set[int]:
    """Ids of parameters whose gradient will be sparse (embeddings built with `sparse=True`)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, EMBEDDINGS) and m.sparse}
