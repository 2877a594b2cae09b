"""Side-by-side timings of muon_torch against torch.optim.Muon + torch.optim.AdamW (CPU)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import muon_core
import torch
from muon_cli.benchtools import gpt2_shapes, interleaved_times, peer_schedule
from muon_core import MuonConfig
from torch.optim._muon import _zeropower_via_newtonschulz as peer_newton_schulz

from muon_torch._newton_schulz import device_facts, newton_schulz
from muon_torch._optimizer import Muon

PEER = "torch.optim.Muon + torch.optim.AdamW"
PEER_NS = "torch.optim.Muon's Newton-Schulz"
PLAIN_NS = "keller-5 written plainly, same dtype"
# Rectangular blocks of GPT-2 small (MLP, 768 x 3072) and of a 1024-wide model (1024 x 4096).
NS_SHAPES = ((768, 3072), (1024, 4096))
# Choices torch.optim.Muon has (EMA momentum, NS in bfloat16, two LR scalings): it would ignore
# another momentum kind or NS dtype without a word, so the peer pair refuses them.
PEER_CHOICES = {"momentum_kind": ("ema",), "ns_dtype": ("bfloat16",),
                "lr_scaling": ("original", "match_rms_adamw")}
# Settings both optimizers can express: Keller's coefficients, EMA Nesterov momentum, no QKV split.
SETTINGS = MuonConfig(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                      ns_coefficients="keller", ns_steps=5, eps=1e-7, ns_dtype="bfloat16",
                      ns_algorithm="standard", lr_scaling="original", split_qkv=False)


def _named_tensors(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=generator) / math.sqrt(s[-1]) for n, s in shapes.items()}


def _with_grads(values: Mapping[str, torch.Tensor],
                grads: Mapping[str, torch.Tensor]) -> dict[str, torch.nn.Parameter]:
    params = {}
    for name, value in values.items():
        params[name] = torch.nn.Parameter(value.clone())
        params[name].grad = grads[name].clone()
    return params


def peer_optimizers(params: Mapping[str, torch.nn.Parameter], config: MuonConfig,
                    plan: muon_core.Plan | None = None) -> dict[str, torch.optim.Optimizer]:
    """{"muon": torch.optim.Muon, "adamw": torch.optim.AdamW (its defaults otherwise)} on the
    parameters `plan` (default: the core's plan of `params`) routes to each, at `config`'s
    settings (refused where torch.optim.Muon cannot express them); an empty half is left out."""
    plan = plan or muon_core.plan({n: tuple(p.shape) for n, p in params.items()}, config)
    schedule = peer_schedule(config, "torch.optim.Muon", PEER_CHOICES)
    hidden = [params[e.name] for e in plan.muon]
    rest = [params[e.name] for e in plan.adamw]
    peers = {}
    if hidden:
        peers["muon"] = torch.optim.Muon(
            hidden, lr=config.lr, weight_decay=config.weight_decay, momentum=config.momentum,
            nesterov=config.nesterov, ns_coefficients=schedule.coefficients[0],
            eps=config.eps, ns_steps=config.ns_steps, adjust_lr_fn=config.lr_scaling)
    if rest:
        peers["adamw"] = torch.optim.AdamW(rest, lr=config.adamw.lr, betas=config.adamw.betas,
                                           eps=config.adamw.eps,
                                           weight_decay=config.adamw.weight_decay)
    return peers


def _row(what: str, peer: str, times: Mapping[str, float]) -> dict:
    return {"what": what, "ours_s": times["ours"], "peer_s": times["peer"],
            "ratio": times["ours"] / times["peer"], "peer": peer}


def _step_contenders(shapes: Mapping[str, tuple[int, ...]],
                     config: MuonConfig) -> dict[str, Callable[[], object]]:
    values = _named_tensors(shapes, seed=0)
    grads = _named_tensors(shapes, seed=1)
    ours = Muon(list(_with_grads(values, grads).items()), config)
    peers = peer_optimizers(_with_grads(values, grads), config)
    return {"ours": ours.step, "peer": lambda: [opt.step() for opt in peers.values()]}


def _ns_contenders(shapes: Mapping[str, tuple[int, ...]],
                   config: MuonConfig) -> dict[str, Callable[[], object]]:
    plan = muon_core.plan(shapes, config)
    schedule = muon_core.ns_schedule(config.ns_coefficients, config.ns_steps,
                                     config.ns_algorithm)
    values = _named_tensors({e.name: e.shape for e in plan.muon}, seed=2)
    stacks: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for name, value in values.items():
        stacks.setdefault(tuple(value.shape), []).append(value)
    batched = [torch.stack(group) for group in stacks.values()]
    coefficients = schedule.coefficients[0]

    def ours() -> list[torch.Tensor]:  # as the optimizer does: cast once, orthogonalize in place
        return [newton_schulz(x, schedule, config.eps, out=x)
                for x in (b.bfloat16() for b in batched)]

    return {"ours": ours,
            "peer": lambda: [peer_newton_schulz(v, coefficients, config.ns_steps, config.eps)
                             for v in values.values()]}


def keller_flops(rows: int, cols: int, steps: int = 5) -> int:
    """The standard flop count of `steps` keller iterations on one `rows x cols` block:
    `steps * (4 m^2 n + 2 m^3)` with m the small side, n the large one."""
    m, n = sorted((rows, cols))
    return steps * (4 * m * m * n + 2 * m**3)


def _plain_contenders(shape: tuple[int, int], algorithm: str,
                      dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """Our Newton-Schulz (keller-5, `algorithm`) against the core's plain iteration run on torch
    tensors, both in `dtype`."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    schedule = muon_core.ns_schedule("keller", 5, algorithm)
    return {"ours": lambda: newton_schulz(x, schedule, 1e-7),
            "peer": lambda: muon_core.orthogonalize(x)}


def bf16_is_native() -> bool:
    """Whether `ns_dtype="auto"` picks bfloat16 on this CPU (else bf16 rows are left out)."""
    return muon_core.auto_ns_dtype(device_facts(torch.device("cpu")))[0] == "bfloat16"


def compare_on(shapes: Mapping[str, tuple[int, ...]], rounds: int = 5, threads: int = 1,
               ns_shapes: tuple[tuple[int, int], ...] = NS_SHAPES,
               with_peer: bool | None = None) -> list[dict]:
    """Timings on the parameter set `shapes` and the blocks `ns_shapes` (see `compare`); the
    bf16 rows against torch.optim.Muon when `with_peer` (default: where bf16 is native)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = [_row(f"Newton-Schulz {m}x{n}, float32, {algorithm}", PLAIN_NS,
                     interleaved_times(_plain_contenders((m, n), algorithm,
                                                                   torch.float32),
                                                 rounds=rounds, warmup=1))
                for m, n in ns_shapes for algorithm in ("gram", "standard")]
        if not (bf16_is_native() if with_peer is None else with_peer):
            # bf16 is emulated here: torch.optim.Muon's steps would take minutes
            return rows
        peer_rows = [("full step, bf16 NS, same settings", PEER, _step_contenders, SETTINGS),
                     ("full step, bf16 NS, our defaults (QKV split, gram)", PEER,
                      _step_contenders, SETTINGS.replace(split_qkv=True, ns_algorithm="gram")),
                     ("Newton-Schulz alone, bf16, GPT-2 matrices", PEER_NS, _ns_contenders,
                      SETTINGS),
                     ("Newton-Schulz alone, bf16, GPT-2 matrices, gram", PEER_NS,
                      _ns_contenders, SETTINGS.replace(ns_algorithm="gram"))]
        return rows + [_row(what, peer, interleaved_times(make(shapes, config),
                                                                    rounds=rounds))
                       for what, peer, make, config in peer_rows]
    finally:
        torch.set_num_threads(previous)


def compare(rounds: int = 5, threads: int = 1) -> list[dict]:
    """Median seconds, one dict per measurement: {"what", "ours_s", "peer_s", "ratio" (ours /
    peer), "peer"}: our float32 Newton-Schulz (gram and standard) against the plain keller-5
    iteration on `NS_SHAPES`, then, where bf16 is native, our step and the peer pair's on GPT-2
    small (`gpt2_shapes()`) and both Newton-Schulz in bf16."""
    return compare_on(gpt2_shapes(), rounds, threads)
