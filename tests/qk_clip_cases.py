"""Attention layers built from explicit per-head matrices, for the QK-clip tests of every
backend: each case packs the heads into parameters in one layout and unpacks them again by
plain slicing, so the logits after clipping are computed independently of muon_core."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

from muon_core import MuonConfig, QKRule, Rule

D_MODEL, HEAD, TOKENS = 12, 4, 10


@dataclasses.dataclass
class Heads:
    """Per-head matrices `(dim, D_MODEL)`: queries, keys (one per key head), optional query
    and key biases `(dim,)`, and for MLA the rotary query parts and the shared rotary key."""

    q: list[np.ndarray]
    k: list[np.ndarray]
    q_bias: list[np.ndarray] | None = None
    k_bias: list[np.ndarray] | None = None
    q_rope: list[np.ndarray] | None = None
    k_rope: np.ndarray | None = None


@dataclasses.dataclass
class Case:
    """A layout: pack heads into named parameters, unpack them, and the config it needs."""

    name: str
    n_q: int
    n_kv: int
    pack: Callable[[Heads], dict[str, np.ndarray]]
    unpack: Callable[[dict[str, np.ndarray]], Heads]
    config: MuonConfig
    layout: str = "out_in"
    bias: bool = False
    mla: bool = False
    values: int = 0


def _rows(mats: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(mats, axis=0)


def _split(x: np.ndarray, n: int) -> list[np.ndarray]:
    return list(np.split(x, n, axis=0))


def _config(*rules: Rule, qk_rules: tuple[QKRule, ...] = ()) -> MuonConfig:
    return MuonConfig(ns_dtype="float32", rules=rules,
                      qk_clip={"threshold": 1.0, "alpha": 0.5, "rules": qk_rules})


def separate(n_q: int, n_kv: int, layout: str = "out_in", bias: bool = False) -> Case:
    """`attn.q_proj` / `attn.k_proj` weights (and biases), torch or flax layout."""
    t = (lambda x: x) if layout == "out_in" else (lambda x: np.ascontiguousarray(x.T))

    def pack(h: Heads) -> dict:
        out = {"attn.q_proj.weight": t(_rows(h.q)), "attn.k_proj.weight": t(_rows(h.k)),
               "attn.v_proj.weight": t(np.ones((n_kv * HEAD, D_MODEL)))}
        if bias:
            out |= {"attn.q_proj.bias": np.concatenate(h.q_bias),
                    "attn.k_proj.bias": np.concatenate(h.k_bias)}
        return out

    def unpack(p: dict) -> Heads:
        return Heads(_split(t(p["attn.q_proj.weight"]), n_q), _split(t(p["attn.k_proj.weight"]),
                                                                     n_kv),
                     _split(p["attn.q_proj.bias"], n_q) if bias else None,
                     _split(p["attn.k_proj.bias"], n_kv) if bias else None)

    return Case(f"separate-{n_q}q{n_kv}kv-{layout}{'-bias' if bias else ''}", n_q, n_kv, pack,
                unpack, _config(), layout, bias)


def fused(n_q: int, n_kv: int, layout: str = "out_in") -> Case:
    """One `attn.qkv` weight: Q rows, then K rows, then V rows (a split rule for GQA)."""
    t = (lambda x: x) if layout == "out_in" else (lambda x: np.ascontiguousarray(x.T))
    sizes = (n_q * HEAD, n_kv * HEAD, n_kv * HEAD)
    rules = () if n_q == n_kv else (Rule(match="*.qkv.*", split=sizes),)

    def pack(h: Heads) -> dict:
        v = np.ones((sizes[2], D_MODEL))
        return {"attn.qkv.weight": t(np.concatenate([_rows(h.q), _rows(h.k), v]))}

    def unpack(p: dict) -> Heads:
        w = t(p["attn.qkv.weight"])
        return Heads(_split(w[:sizes[0]], n_q), _split(w[sizes[0]:sizes[0] + sizes[1]], n_kv))

    return Case(f"fused-{n_q}q{n_kv}kv-{layout}", n_q, n_kv, pack, unpack, _config(*rules),
                layout)


def per_head(n_q: int, n_kv: int, layout: str = "out_in") -> Case:
    """Per-head kernels: torch `(heads, dim, d_model)`, flax `(d_model, heads, dim)`; the
    query kernel is one matrix over (heads, dim), the key kernel a batch of heads."""
    if layout == "out_in":
        rules = (Rule(match="*.query.*", out_axes=(0, 1), in_axes=(2,)),
                 Rule(match="*.key.*", out_axes=(1,), in_axes=(2,)))
        pack_one = np.stack
        unpack_one = list
    else:
        rules = (Rule(match="*.query.*", out_axes=(1, 2), in_axes=(0,)),
                 Rule(match="*.key.*", out_axes=(2,), in_axes=(0,)))
        pack_one = lambda mats: np.ascontiguousarray(np.stack(mats).transpose(2, 0, 1))  # noqa: E731
        unpack_one = lambda x: list(x.transpose(1, 2, 0))  # noqa: E731

    def pack(h: Heads) -> dict:
        return {"attn.query.kernel": pack_one(h.q), "attn.key.kernel": pack_one(h.k)}

    def unpack(p: dict) -> Heads:
        return Heads(unpack_one(p["attn.query.kernel"]), unpack_one(p["attn.key.kernel"]))

    return Case(f"per_head-{n_q}q{n_kv}kv-{layout}", n_q, n_kv, pack, unpack, _config(*rules),
                layout)


ROPE, VALUES = 2, 3


def mla(n_q: int, layout: str = "out_in") -> Case:
    """Multi-head latent attention: each query head is [nope | rope] rows; the key/value
    up-projection holds [key nope | value] rows per head; one rotary key shared by all."""
    t = (lambda x: x) if layout == "out_in" else (lambda x: np.ascontiguousarray(x.T))
    qk_rules = (QKRule("*.q_b.*", "query", rope_dim=ROPE),
                QKRule("*.kv_b.*", "key", value_dim=VALUES),
                QKRule("*.kv_a.*", "none"))

    def pack(h: Heads) -> dict:
        q = _rows([np.concatenate([n, r]) for n, r in zip(h.q, h.q_rope)])
        kv = _rows([np.concatenate([k, np.ones((VALUES, D_MODEL))]) for k in h.k])
        return {"attn.q_b.weight": t(q), "attn.kv_b.weight": t(kv), "attn.kv_a.weight":
                t(h.k_rope)}

    def unpack(p: dict) -> Heads:
        q = _split(t(p["attn.q_b.weight"]), n_q)
        kv = _split(t(p["attn.kv_b.weight"]), n_q)
        return Heads([x[:HEAD] for x in q], [x[:HEAD] for x in kv],
                     q_rope=[x[HEAD:] for x in q], k_rope=t(p["attn.kv_a.weight"]))

    return Case(f"mla-{n_q}q-{layout}", n_q, n_q, pack, unpack, _config(qk_rules=qk_rules),
                layout, mla=True)


def all_cases() -> list[Case]:
    """Every layout family in both layouts, MHA and GQA."""
    cases = []
    for layout in ("out_in", "in_out"):
        cases += [separate(4, 4, layout), separate(4, 2, layout), separate(4, 1, layout, True),
                  fused(3, 3, layout), fused(4, 2, layout), per_head(4, 4, layout),
                  mla(3, layout)]
    return cases


def random_heads(case: Case, rng: np.random.Generator) -> Heads:
    """Per-head matrices with very different scales, so some heads' logits are large."""
    def mats(n: int, rows: int) -> list[np.ndarray]:
        return [rng.uniform(0.1, 2.0) * rng.standard_normal((rows, D_MODEL)) for _ in range(n)]

    def vecs(n: int) -> list[np.ndarray]:
        return [rng.standard_normal(HEAD) for _ in range(n)]

    return Heads(mats(case.n_q, HEAD), mats(case.n_kv, HEAD),
                 vecs(case.n_q) if case.bias else None, vecs(case.n_kv) if case.bias else None,
                 mats(case.n_q, ROPE) if case.mla else None,
                 rng.standard_normal((ROPE, D_MODEL)) if case.mla else None)


def head_logits(h: Heads, x: np.ndarray, n_q: int, n_kv: int) -> list[np.ndarray]:
    """Each query head's logits `(tokens, tokens)` on inputs `x`, scale 1/sqrt(dim), computed
    head by head (query head i meets key head i // (n_q // n_kv))."""
    out = []
    for i in range(n_q):
        j = i // (n_q // n_kv)
        q, k = x @ h.q[i].T, x @ h.k[j].T
        if h.q_bias is not None:
            q, k = q + h.q_bias[i], k + h.k_bias[j]
        logits = q @ k.T
        if h.q_rope is not None:
            logits = logits + (x @ h.q_rope[i].T) @ (x @ h.k_rope.T).T
        out.append(logits / np.sqrt(q.shape[1] + (0 if h.q_rope is None else ROPE)))
    return out


def clip_and_check(case: Case, backend_clip: Callable, seed: int = 0) -> tuple[list, list]:
    """Clip with the logits' own maxima and check each head's new maximum: tau where its
    key group's largest logit exceeded tau (for that largest head), at most tau for the
    others of such a group, unchanged where no head of the group exceeded it."""
    rng = np.random.default_rng(seed)
    heads = random_heads(case, rng)
    x = rng.standard_normal((TOKENS, D_MODEL))
    before = [lg.max() for lg in head_logits(heads, x, case.n_q, case.n_kv)]
    tau = float(np.median(before))
    config = case.config.replace(qk_clip={**case.config.qk_clip.to_dict(), "threshold": tau})
    params = case.pack(heads)
    clipped = backend_clip(params, {"attn": np.array(before)}, config, case.layout)
    after = [lg.max() for lg in head_logits(case.unpack(clipped), x, case.n_q, case.n_kv)]
    group = case.n_q // case.n_kv
    for i, (b, a) in enumerate(zip(before, after)):
        members = before[(i // group) * group:(i // group + 1) * group]
        if max(members) <= tau:
            assert a == pytest.approx(b, rel=1e-12), f"head {i}: no clip expected"
        elif b == max(members):
            assert a == pytest.approx(tau, rel=1e-9), f"head {i}: expected tau"
        else:
            assert a <= tau * (1 + 1e-9) and a < b, f"head {i}: expected <= tau"
    untouched = [n for n in params if n.endswith(("v_proj.weight", "kv_a.weight"))]
    for name in untouched:
        np.testing.assert_array_equal(clipped[name], params[name])
    return before, after
