"""What the plan knows about common architectures, from parameter names and shapes alone.

Names are read component by component (`"model.layers.0.self_attn.qkv_proj.weight"` ->
`["layers", "0", "self_attn", "qkv_proj", "weight"]`, wrapper prefixes dropped), so a known
name counts wherever it sits in the path.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

# Leading path components added by wrappers (DDP, torch.compile, FSDP, flax variables).
WRAPPER_PREFIXES = ("module", "_orig_mod", "model", "params", "_fsdp_wrapped_module")

# Embedding tables and learned positions: exact components, and common prefixes/suffixes.
EMBEDDING_NAMES = frozenset({
    "emb", "embed", "embeds", "embedding", "embeddings", "embed_tokens", "embed_positions",
    "wte", "wpe", "tok_embeddings", "token_embedding", "pos_embedding", "pos_embed",
    "position_embeddings", "position_embedding", "word_embeddings", "token_type_embeddings",
    "relative_attention_bias"})
EMBEDDING_SUFFIXES = ("_emb", "_embed", "_embeds", "_embedding", "_embeddings")
# Learned tokens (ViT `cls_token`, `mask_token`, `register_tokens`): vectors, not layers.
TOKEN_SUFFIXES = ("_token", "_tokens")
# State-space parameters (Mamba `A_log`): not the weight of a linear map.
STATE_SPACE_NAMES = frozenset({"A_log"})
# Output heads: the projection whose output is the logits (or the final embedding, CLIP).
HEAD_NAMES = frozenset({"lm_head", "head", "classifier", "score", "fc_out", "output_projection",
                        "output_layer", "qa_outputs", "visual_projection", "text_projection"})
# Names that count only as the first component: LLaMA's original checkpoints call the head
# `output` (in BERT `output` is a hidden block); T5 calls its token table `shared`.
FIRST_COMPONENT_HEADS = frozenset({"output"})
FIRST_COMPONENT_EMBEDDINGS = frozenset({"shared"})

# Fused Q/K/V projections, by the name of the module (or torch parameter) that holds them:
#   "contiguous": rows [Q | K | V] (GPT-2 c_attn, timm/minGPT qkv, MPT Wqkv, Phi-3 qkv_proj,
#                 torch nn.MultiheadAttention in_proj_weight);
#   "grouped":    rows stored per key/value head, each group [q heads of the group, k, v]
#                 (GPT-NeoX, BLOOM and Falcon query_key_value, InternLM2 wqkv).
FUSED_QKV = {"c_attn": "contiguous", "qkv": "contiguous", "Wqkv": "contiguous",
             "qkv_proj": "contiguous", "in_proj_weight": "contiguous",
             "query_key_value": "grouped", "wqkv": "grouped"}
# Hugging Face GPT-2's Conv1D modules store their weight (in, out).
GPT2_CONV1D_NAMES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})


def components(name: str) -> list[str]:
    """The path components of a parameter name, wrapper prefixes dropped (and flax nnx's
    trailing `value`, the field of its Variable)."""
    return list(_components(name))


@functools.lru_cache(maxsize=1 << 16)
def _components(name: str) -> tuple[str, ...]:
    parts = [p for p in name.replace("/", ".").replace("[", ".").replace("]", "").split(".") if p]
    while len(parts) > 1 and parts[0] in WRAPPER_PREFIXES:
        parts = parts[1:]
    if len(parts) > 2 and parts[-1] == "value":
        parts = parts[:-1]
    return tuple(parts)


def _is_embedding(part: str) -> bool:
    return (part in EMBEDDING_NAMES or part.startswith("embed")
            or part.endswith(EMBEDDING_SUFFIXES))


def name_kind(name: str) -> tuple[str, str] | None:
    """`(kind, why)` when the name alone says the tensor is not a hidden matrix, else None.

    kind is "embedding" (tables, learned positions and tokens), "head" (output projections)
    or "other" (biases of any shape, state-space parameters).
    """
    parts = components(name)
    modules = parts[:-1] or parts
    if parts[-1] == "bias":  # flax attention biases are (heads, head_dim)
        return "other", "bias by name"
    if modules[0] in FIRST_COMPONENT_EMBEDDINGS:
        return "embedding", f"embedding by name ({modules[0]!r})"
    for part in parts:
        if _is_embedding(part):
            return "embedding", f"embedding by name ({part!r})"
        if part.endswith(TOKEN_SUFFIXES):
            return "embedding", f"learned token by name ({part!r})"
        if part in STATE_SPACE_NAMES:
            return "other", f"state-space parameter by name ({part!r})"
    for part in modules:
        if part in HEAD_NAMES:
            return "head", f"output head by name ({part!r})"
    if modules[0] in FIRST_COMPONENT_HEADS:
        return "head", f"output head by name ({modules[0]!r})"
    return None


def qkv_kind(name: str) -> str | None:
    """"contiguous" or "grouped" when the name is a known fused Q/K/V projection, else None."""
    parts = components(name)
    owner = parts[-1] if parts[-1] == "in_proj_weight" else (parts[-2] if len(parts) > 1 else "")
    return FUSED_QKV.get(owner)


def fused_qkv_blocks(kind: str, rows: int, cols: int,
                     heads: tuple[int, int] | None) -> tuple[tuple[int, ...], int] | None:
    """`(blocks, groups)` of a fused projection with `rows` outputs, or None when unknown.

    `heads` is (query heads, key/value heads) when the model says so. Without it only an
    equal-thirds contiguous layout whose Q is square (rows = 3 * cols) is certain.
    """
    if heads is not None:
        n_q, n_kv = heads
        head_dim, rest = divmod(rows, n_q + 2 * n_kv)
        if rest or n_q % n_kv:
            return None
        return (n_q * head_dim, n_kv * head_dim, n_kv * head_dim), (n_kv if kind == "grouped"
                                                                    else 1)
    if kind == "contiguous" and rows == 3 * cols:
        return (cols,) * 3, 1
    return None


def qkv_rule_hint(name: str, kind: str, rows: int) -> str:
    """The rule to write when a fused projection's sizes are unknown."""
    groups = ", groups = <number of key/value heads>" if kind == "grouped" else ""
    return (f"fused Q/K/V left whole (sizes unknown, {rows} rows): to split it add "
            f"[[muon.rules]] match = {name!r}, split = [<q rows>, <k rows>, <v rows>]{groups}")


def gpt2_conv1d_names(shapes: Mapping[str, Sequence[int]]) -> set[str]:
    """Weights stored (in, out) by Hugging Face GPT-2's Conv1D, recognised from names and shapes.

    nanoGPT uses the same names with `nn.Linear` (out, in); the two are told apart by c_attn,
    whose output is three times its input: (d, 3d) is Conv1D.
    """
    conv1d = any(components(n)[-2:-1] == ["c_attn"] and len(s) == 2 and s[1] == 3 * s[0]
                 for n, s in shapes.items() if components(n)[-1] == "weight")
    if not conv1d:
        return set()
    return {n for n, s in shapes.items() if len(s) == 2 and components(n)[-1] == "weight"
            and components(n)[-2:-1] and components(n)[-2] in GPT2_CONV1D_NAMES}


def grouped_view(shape: tuple[int, ...], out_axis: int, blocks: tuple[int, ...],
                 groups: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(view shape, output axes in the view) that make interleaved blocks contiguous.

    The output axis holds `groups` groups, each with `block / groups` rows of every block; it
    is viewed as (groups, slots, slot) with `slot` the largest size dividing every share, and
    the slots axis is put first, so rows come block by block (rows within a block are only
    reordered, which orthogonalization commutes with).
    """
    shares = [b // groups for b in blocks]
    slot = math.gcd(*shares)
    view = shape[:out_axis] + (groups, sum(shares) // slot, slot) + shape[out_axis + 1:]
    return view, (out_axis + 1, out_axis, out_axis + 2)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def moe_routers(shapes: Mapping[str, Sequence[int]]) -> dict[str, str]:
    """Router weights of mixture-of-experts layers: a 2-D `gate`/`router` weight next to an
    `experts` module (Mixtral, DeepSeek-V3, Qwen-MoE); its output is the logits over experts.
    Returns name -> why."""
    blocks = {n.partition(".experts.")[0] for n in shapes if ".experts." in n}
    blocks |= {"" for n in shapes if n.startswith("experts.")}
    found = {}
    for name, shape in shapes.items():
        parts = components(name)
        owner = parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]
        block = _parent(_parent(name)) if parts[-1] == "weight" else _parent(name)
        if len(shape) == 2 and owner in ("gate", "router") and block in blocks:
            found[name] = f"mixture-of-experts router by name ({owner!r})"
    return found


def expert_layouts(shapes: Mapping[str, Sequence[int]], layout: str) -> dict[str, str]:
    """Layout of each 3-D expert tensor (experts, out, in) or (experts, in, out), axis 0 being
    the experts. Read from the pair gate_up_proj (2 * intermediate outputs) and down_proj
    when both are there, else the model's layout."""
    found = {}
    for name, shape in shapes.items():
        parts = components(name)
        if len(shape) != 3 or "experts" not in parts[:-1]:
            continue
        found[name] = layout
        base = _parent(name)
        up, down = shapes.get(base + ".gate_up_proj"), shapes.get(base + ".down_proj")
        if up is not None and down is not None and len(up) == len(down) == 3:
            if up[1] == 2 * down[2] and up[2] == down[1]:
                found[name] = "out_in"
            elif up[2] == 2 * down[1] and up[1] == down[2]:
                found[name] = "in_out"
    return found


def gate_up_split(name: str, rows: int, layout: str) -> tuple[tuple[int, ...] | None, str]:
    """(blocks, note or flag) of a fused expert gate/up projection."""
    if components(name)[-1] != "gate_up_proj" or rows % 2:
        return None, ""
    if layout == "out_in":
        return (rows // 2, rows // 2), "fused gate/up, contiguous halves"
    return None, ("fused gate/up stored (in, out) left whole: Llama 4 keeps the halves "
                  "contiguous, GPT-OSS interleaves them; to split add [[muon.rules]] "
                  f"match = {name!r}, split = [{rows // 2}, {rows // 2}] (and groups = "
                  f"{rows // 2} if interleaved)")


# flax's attention projections (DenseGeneral) keep heads as an axis: query/key/value kernels
# are (in, heads, head_dim); `out` is (heads, head_dim, out), which the in_out layout reads.
PER_HEAD_INPUTS = frozenset({"query", "key", "value"})


def per_head_axes(name: str, shape: Sequence[int],
                  layout: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(out_axes, in_axes) of a flax per-head query/key/value kernel, else None."""
    parts = components(name)
    if layout == "in_out" and len(shape) == 3 and len(parts) > 1 and \
            parts[-2] in PER_HEAD_INPUTS and parts[-1] == "kernel":
        return (1, 2), (0,)
    return None
