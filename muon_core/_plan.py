"""The routing plan: for each parameter, which algorithm, which matrix view, which LR scale, and why."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Iterator, Mapping, Sequence

from muon_core._config import ALGORITHMS, LAYOUTS, LR_SCALINGS, MuonConfig, Rule

# Names of modules whose 2-D weights are not hidden matrices.
EMBEDDING_NAMES = frozenset({"embed", "embeds", "embedding", "embeddings", "embed_tokens", "wte",
                             "wpe", "tok_embeddings", "token_embedding", "pos_embedding",
                             "position_embeddings", "word_embeddings"})
HEAD_NAMES = frozenset({"lm_head", "head", "output", "classifier", "fc_out"})
WRAPPER_PREFIXES = ("module", "_orig_mod", "model", "params", "_fsdp_wrapped_module")
QKV_NAMES = ("qkv", "c_attn", "in_proj", "query_key_value", "wqkv")
MODULE_KINDS = ("embedding", "head", "hidden", "norm")


def lr_scale(rows: int, cols: int, scaling: str) -> float:
    """The LR multiplier of an (out=rows, in=cols) matrix under the given `lr_scaling`."""
    if scaling == "original":
        return math.sqrt(max(1.0, rows / cols))
    if scaling == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if scaling == "spectral":
        return math.sqrt(rows / cols)
    if scaling == "none":
        return 1.0
    raise ValueError(f"lr_scaling={scaling!r} is invalid: expected one of {list(LR_SCALINGS)}")


@dataclasses.dataclass(frozen=True)
class ParamPlan:
    """One parameter's decision.

    For Muon parameters the tensor is viewed as a batch of matrices: axes are permuted by
    `perm` to (batch..., out..., in...) and reshaped to `matrix_shape = (batch, rows, cols)`;
    the rows are cut into `blocks` (fused QKV), each orthogonalized alone with its `lr_scales`.
    """

    name: str
    shape: tuple[int, ...]
    algorithm: str
    decided_by: str
    why: str
    perm: tuple[int, ...] = ()
    matrix_shape: tuple[int, int, int] = (0, 0, 0)
    blocks: tuple[int, ...] = ()
    lr_scales: tuple[float, ...] = ()

    @property
    def is_muon(self) -> bool:
        """Whether Muon updates this parameter."""
        return self.algorithm == "muon"

    @property
    def permuted_shape(self) -> tuple[int, ...]:
        """The shape after `perm`, before the reshape to `matrix_shape`."""
        return tuple(self.shape[i] for i in self.perm)

    @property
    def inverse_perm(self) -> tuple[int, ...]:
        """The permutation that undoes `perm`."""
        return tuple(sorted(range(len(self.perm)), key=self.perm.__getitem__))

    @property
    def block_offsets(self) -> tuple[int, ...]:
        """Start row of each block."""
        starts, total = [], 0
        for size in self.blocks:
            starts.append(total)
            total += size
        return tuple(starts)

    def reshape_text(self) -> str:
        """A short description of the matrix view, for the plan table."""
        if not self.is_muon:
            return "-"
        batch, rows, cols = self.matrix_shape
        view = f"{rows}x{cols}" if batch == 1 else f"{batch}x({rows}x{cols})"
        if self.perm != tuple(range(len(self.shape))):
            view = f"perm{list(self.perm)} -> {view}"
        if len(self.blocks) > 1:
            view += " split " + "+".join(map(str, self.blocks))
        return view


def _components(name: str) -> list[str]:
    parts = [p for p in name.replace("/", ".").replace("[", ".").replace("]", "").split(".") if p]
    while len(parts) > 1 and parts[0] in WRAPPER_PREFIXES:
        parts = parts[1:]
    return parts


def _name_kind(name: str) -> str | None:
    """'embedding' or 'head' when the name says so, else None."""
    parts = _components(name)
    modules = parts[:-1] or parts
    if any(p in EMBEDDING_NAMES or p.startswith("embed") for p in parts):
        return "embedding"
    if modules and modules[0] in HEAD_NAMES:
        return "head"
    return None


def _rule_applies(rule: Rule, name: str, shape: tuple[int, ...]) -> bool:
    return (fnmatch.fnmatchcase(name, rule.match)
            and (rule.ndim is None or rule.ndim == len(shape))
            and (rule.shape is None or tuple(rule.shape) == shape))


def _normalise_axes(axes: Sequence[int], ndim: int, name: str, what: str) -> tuple[int, ...]:
    out = tuple(a % ndim if -ndim <= a < ndim else None for a in axes)
    if None in out or len(set(out)) != len(out):
        raise ValueError(f"parameter {name!r}: {what}={tuple(axes)} is invalid for a {ndim}-D "
                         "tensor: expected distinct axes in range")
    return out


def _default_axes(ndim: int, layout: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Output and input axes: torch puts `out` first, flax puts it last."""
    if layout == "out_in":
        return (0,), tuple(range(1, ndim))
    return (ndim - 1,), tuple(range(ndim - 1))


def _qkv_blocks(name: str, rows: int, config: MuonConfig) -> tuple[int, ...] | None:
    parts = _components(name)
    if config.split_qkv and rows % 3 == 0 and any(
            key in part for part in parts for key in QKV_NAMES):
        return (rows // 3,) * 3
    return None


def _muon_entry(name: str, shape: tuple[int, ...], decided_by: str, why: str,
                rules: list[Rule], config: MuonConfig, layout: str) -> ParamPlan:
    ndim = len(shape)
    dims = next((r for r in rules if r.out_axes is not None), None)
    if dims is not None:
        out_axes = _normalise_axes(dims.out_axes, ndim, name, "out_axes")
        in_axes = _normalise_axes(dims.in_axes, ndim, name, "in_axes")
        if set(out_axes) & set(in_axes):
            raise ValueError(f"parameter {name!r}: out_axes={out_axes} and in_axes={in_axes} "
                             "overlap: expected disjoint axes")
    else:
        out_axes, in_axes = _default_axes(ndim, layout)
    batch_axes = tuple(a for a in range(ndim) if a not in out_axes + in_axes)
    perm = batch_axes + out_axes + in_axes
    batch = math.prod(shape[a] for a in batch_axes)
    rows = math.prod(shape[a] for a in out_axes)
    cols = math.prod(shape[a] for a in in_axes)
    split_rule = next((r for r in rules if r.split is not None), None)
    blocks = split_rule.split if split_rule is not None else _qkv_blocks(name, rows, config)
    if blocks is None:
        blocks = (rows,)
    elif sum(blocks) != rows:
        raise ValueError(f"parameter {name!r} with shape {shape}: split={blocks} sums to "
                         f"{sum(blocks)}, expected the output size {rows}")
    scales = tuple(lr_scale(b, cols, config.lr_scaling) for b in blocks)
    return ParamPlan(name, shape, "muon", decided_by, why, perm, (batch, rows, cols),
                     tuple(blocks), scales)


def _decide(name: str, shape: tuple[int, ...], rules: list[Rule], group_algorithm: str | None,
            module_kind: str | None) -> tuple[str, str, str]:
    """Return (algorithm, decided_by, why), most explicit layer first."""
    if group_algorithm is not None:
        return group_algorithm, "group", f"param group asks for {group_algorithm}"
    for rule in rules:
        if rule.algorithm is not None:
            return rule.algorithm, "rule", f"rule match={rule.match!r}"
    if len(shape) < 2 or 0 in shape:
        return "adamw", "shape", f"{len(shape)}-D tensor" if 0 not in shape else "empty tensor"
    if module_kind in ("embedding", "head", "norm"):
        return "adamw", "module", f"{module_kind} module"
    if module_kind == "hidden":
        return "muon", "module", "hidden layer module"
    kind = _name_kind(name)
    if kind is not None:
        return "adamw", "name", f"{kind} by name"
    return "muon", "shape", f"{len(shape)}-D hidden matrix"


def plan_param(name: str, shape: Sequence[int], config: MuonConfig, *, layout: str = "out_in",
               group_algorithm: str | None = None, module_kind: str | None = None) -> ParamPlan:
    """Decide one parameter; see `plan`."""
    shape = tuple(int(s) for s in shape)
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid: expected one of {list(LAYOUTS)}")
    if group_algorithm is not None and group_algorithm not in ALGORITHMS:
        raise ValueError(f"parameter {name!r}: algorithm={group_algorithm!r} is invalid: "
                         f"expected one of {list(ALGORITHMS)}")
    if module_kind is not None and module_kind not in MODULE_KINDS:
        raise ValueError(f"parameter {name!r}: module kind {module_kind!r} is invalid: "
                         f"expected one of {list(MODULE_KINDS)}")
    rules = [r for r in config.rules if _rule_applies(r, name, shape)]
    algorithm, decided_by, why = _decide(name, shape, rules, group_algorithm, module_kind)
    if algorithm == "adamw":
        return ParamPlan(name, shape, "adamw", decided_by, why)
    if len(shape) < 2 or 0 in shape:
        raise ValueError(f"parameter {name!r} with shape {shape} is routed to muon by "
                         f"{decided_by} ({why}), but Muon needs a tensor with ndim >= 2 "
                         "and no empty axis")
    return _muon_entry(name, shape, decided_by, why, rules, config, layout)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The routing decision for every parameter of a model, in order."""

    entries: tuple[ParamPlan, ...]
    config: MuonConfig
    # The backend's `describe_ns_dtype` for its device: shown, not part of the decision.
    ns_dtype_note: str | None = dataclasses.field(default=None, compare=False)

    def __iter__(self) -> Iterator[ParamPlan]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> ParamPlan:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(f"no parameter named {name!r} in the plan")

    @property
    def muon(self) -> tuple[ParamPlan, ...]:
        """Entries routed to Muon."""
        return tuple(e for e in self.entries if e.is_muon)

    @property
    def adamw(self) -> tuple[ParamPlan, ...]:
        """Entries routed to AdamW."""
        return tuple(e for e in self.entries if not e.is_muon)

    def ns_batches(self) -> dict[tuple[int, int], list[tuple[str, int]]]:
        """Blocks grouped by matrix shape `(rows, cols)`: each group is one batched NS call."""
        groups: dict[tuple[int, int], list[tuple[str, int]]] = {}
        for entry in self.muon:
            for index, rows in enumerate(entry.blocks):
                groups.setdefault((rows, entry.matrix_shape[2]), []).append((entry.name, index))
        return groups

    def table(self) -> str:
        """A fixed-width table: name, shape, algorithm, matrix view, LR scale, decided by, why."""
        header = ("name", "shape", "algorithm", "matrix view", "lr scale", "decided by", "why")
        rows = [header]
        for e in self.entries:
            scales = "/".join(f"{s:.3g}" for s in dict.fromkeys(e.lr_scales)) or "-"
            rows.append((e.name, "x".join(map(str, e.shape)) or "scalar", e.algorithm,
                         e.reshape_text(), scales, e.decided_by, e.why))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        n_muon = sum(math.prod(e.shape) for e in self.muon)
        total = n_muon + sum(math.prod(e.shape) for e in self.adamw)
        lines.append(f"{len(self.muon)} of {len(self)} tensors ({n_muon:,} of {total:,} "
                     f"values) use Muon; lr_scaling={self.config.lr_scaling!r}; "
                     f"{self.ns_dtype_note or f'ns_dtype={self.config.ns_dtype!r}'}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def plan(shapes: Mapping[str, Sequence[int]], config: MuonConfig | None = None, *,
         layout: str = "out_in", algorithms: Mapping[str, str] | None = None,
         module_kinds: Mapping[str, str] | None = None) -> Plan:
    """Route every parameter of a model to Muon or AdamW and describe its matrix view.

    `shapes` maps parameter names to shapes. `layout` says where the output axis is:
    "out_in" (torch `Linear.weight`, conv `(out, in, kh, kw)`) or "in_out" (flax `Dense.kernel`,
    conv `(kh, kw, in, out)`); the same layer gets the same LR scale in both. Decisions, most
    explicit first: `algorithms` (from param groups), `config.rules`, `module_kinds` (what the
    backend saw: "embedding", "head", "hidden", "norm"), then 0/1-D tensors to AdamW, then
    common embedding/head names, then every other matrix to Muon.
    """
    config = MuonConfig() if config is None else config
    if not isinstance(shapes, Mapping):
        raise TypeError(f"shapes must map parameter names to shapes, got {type(shapes).__name__}")
    algorithms = algorithms or {}
    module_kinds = module_kinds or {}
    entries = tuple(plan_param(name, shape, config, layout=layout,
                               group_algorithm=algorithms.get(name),
                               module_kind=module_kinds.get(name))
                    for name, shape in shapes.items())
    return Plan(entries, config)
