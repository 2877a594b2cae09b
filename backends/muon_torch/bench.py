"""Side-by-side timings of muon_torch against torch.optim.Muon + torch.optim.AdamW (CPU)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping

import muon_core
import numpy as np
import torch
import torch.optim._muon as torch_muon
from muon_cli.benchtools import gpt2_shapes, interleaved_times, peer_schedule, polar_errors
from muon_core import MuonConfig
from torch.optim._muon import _zeropower_via_newtonschulz as peer_newton_schulz

from muon_torch._newton_schulz import device_facts, newton_schulz
from muon_torch._optimizer import Muon

PEER = "torch.optim.Muon + torch.optim.AdamW"
PEER_FLOAT32 = "torch.optim.Muon with float32 NS + torch.optim.AdamW"
PEER_NS = "torch.optim.Muon's Newton-Schulz"
PLAIN_NS = "keller-5 written plainly, same dtype"
# Rectangular blocks of GPT-2 small (MLP, 768 x 3072) and of a 1024-wide model (1024 x 4096).
NS_SHAPES = ((768, 3072), (1024, 4096))
# Choices torch.optim.Muon has (EMA momentum, two LR scalings; NS in bfloat16, or in float32
# through `Float32NSMuon`): it would ignore another momentum kind or NS dtype without a word, so
# the peer pair refuses them.
PEER_CHOICES = {"momentum_kind": ("ema",), "ns_dtype": ("bfloat16", "float32"),
                "lr_scaling": ("original", "match_rms_adamw")}
# Settings both optimizers can express: Keller's coefficients, EMA Nesterov momentum, no QKV split.
SETTINGS = MuonConfig(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                      ns_coefficients="keller", ns_steps=5, eps=1e-7, ns_dtype="bfloat16",
                      ns_algorithm="standard", lr_scaling="original", split_qkv=False)


# The same with float32 Newton-Schulz, for CPUs that emulate bfloat16 (where "auto" picks float32).
FLOAT32_SETTINGS = SETTINGS.replace(ns_dtype="float32")
# Our defaults there: ns_dtype "auto" = float32, ns_algorithm "auto" = gram, QKV split.
FLOAT32_DEFAULTS = FLOAT32_SETTINGS.replace(ns_algorithm="gram", split_qkv=True)
FLOAT32_ROWS = {"full step, fp32 NS, same settings": FLOAT32_SETTINGS,
                "full step, fp32 NS, gram": FLOAT32_SETTINGS.replace(ns_algorithm="gram"),
                "full step, fp32 NS, our defaults (QKV split, gram)": FLOAT32_DEFAULTS,
                "full step, fp32 NS, our defaults, quintic x4":
                    FLOAT32_DEFAULTS.replace(ns_coefficients="quintic", ns_steps=4)}


def _float32_keller(grad: torch.Tensor, ns_coefficients: tuple[float, float, float],
                    ns_steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz call, computed in float32: the same iteration (the
    core's plain one), the result in float32 where torch's is bfloat16."""
    return muon_core.orthogonalize(grad, ns_steps, ns_coefficients, eps, dtype="float32")


@contextlib.contextmanager
def float32_peer_newton_schulz() -> Iterator[None]:
    """Inside this block torch.optim.Muon computes its Newton-Schulz in float32 (its module's
    `_zeropower_via_newtonschulz` is replaced); the original is restored on exit."""
    original = torch_muon._zeropower_via_newtonschulz
    torch_muon._zeropower_via_newtonschulz = _float32_keller
    try:
        yield
    finally:
        torch_muon._zeropower_via_newtonschulz = original


class Float32NSMuon(torch.optim.Muon):
    """torch.optim.Muon whose steps compute Newton-Schulz in float32 instead of bfloat16: the
    only change; every other part of the step is torch.optim.Muon's own."""

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """torch.optim.Muon's step under `float32_peer_newton_schulz`."""
        with float32_peer_newton_schulz():
            return super().step(closure)


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
    settings (refused where torch.optim.Muon cannot express them; `ns_dtype="float32"` gives a
    `Float32NSMuon`); an empty half is left out."""
    plan = plan or muon_core.plan({n: tuple(p.shape) for n, p in params.items()}, config)
    schedule = peer_schedule(config, "torch.optim.Muon", PEER_CHOICES)
    hidden = [params[e.name] for e in plan.muon]
    rest = [params[e.name] for e in plan.adamw]
    peers = {}
    if hidden:
        muon_class = Float32NSMuon if config.ns_dtype == "float32" else torch.optim.Muon
        peers["muon"] = muon_class(
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


def _step_contenders(shapes: Mapping[str, tuple[int, ...]], ours: Mapping[str, MuonConfig],
                     peer_config: MuonConfig = SETTINGS) -> dict[str, Callable[[], object]]:
    """One step of our optimizer at each config of `ours` (under the same names) and of the peer
    pair at `peer_config` ("peer"), each on its own copy of the same parameters and gradients."""
    values = _named_tensors(shapes, seed=0)
    grads = _named_tensors(shapes, seed=1)
    steps = {name: Muon(list(_with_grads(values, grads).items()), config).step
             for name, config in ours.items()}
    peers = peer_optimizers(_with_grads(values, grads), peer_config)
    return steps | {"peer": lambda: [opt.step() for opt in peers.values()]}


def float32_step_rows(shapes: Mapping[str, tuple[int, ...]], rounds: int = 5) -> list[dict]:
    """Our step at `FLOAT32_ROWS` and the peer pair's with float32 Newton-Schulz
    (`Float32NSMuon`) on the parameter set `shapes`, interleaved in one run: one row each."""
    times = interleaved_times(_step_contenders(shapes, FLOAT32_ROWS, FLOAT32_SETTINGS),
                              rounds=rounds, warmup=1)
    return [_row(what, PEER_FLOAT32, {"ours": times[what], "peer": times["peer"]})
            for what in FLOAT32_ROWS]


def accuracy_on(shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> list[dict]:
    """Orthogonalization accuracy of the float32 contenders (the peer's float32 Newton-Schulz
    and ours at each config of `FLOAT32_ROWS`) on a Gaussian matrix of each block shape they
    orthogonalize in `shapes` (the QKV split gives 768x768 blocks where the peer has one
    2304x768 matrix), as `muon_cli.benchtools.polar_errors` against the float64 polar factor:
    one dict per (shape, contender): {"shape", "what", "min_sigma", "max_sigma", "distance"}."""
    schedule = peer_schedule(FLOAT32_SETTINGS, PEER, PEER_CHOICES)
    contenders = {PEER_FLOAT32: (FLOAT32_SETTINGS, lambda x: _float32_keller(
        x, schedule.coefficients[0], FLOAT32_SETTINGS.ns_steps, FLOAT32_SETTINGS.eps))}
    for what, config in FLOAT32_ROWS.items():
        ours = muon_core.ns_schedule(config.ns_coefficients, config.ns_steps, config.ns_algorithm)
        contenders[what] = (config, lambda x, s=ours, eps=config.eps: newton_schulz(x, s, eps))
    rng, matrices, rows = np.random.default_rng(seed), {}, []
    for what, (config, orthogonalize) in contenders.items():
        blocks = {(height, e.matrix_shape[2]) for e in muon_core.plan(shapes, config).muon
                  for height in e.blocks}
        for shape in sorted(blocks):
            g = matrices.setdefault(shape, rng.standard_normal(shape))
            o = orthogonalize(torch.from_numpy(g).float()).double().numpy()
            low, high, distance = polar_errors(g, o)
            rows.append({"shape": shape, "what": what, "min_sigma": low, "max_sigma": high,
                         "distance": distance})
    return rows


def _bf16_step(shapes: Mapping[str, tuple[int, ...]],
               config: MuonConfig) -> dict[str, Callable[[], object]]:
    return _step_contenders(shapes, {"ours": config})


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
    """Timings on the parameter set `shapes` and the blocks `ns_shapes` (see `compare`): the
    bf16 rows against torch.optim.Muon when `with_peer` (default: where bf16 is native), else
    the float32 full-step rows (`float32_step_rows`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = [_row(f"Newton-Schulz {m}x{n}, float32, {algorithm}", PLAIN_NS,
                     interleaved_times(_plain_contenders((m, n), algorithm,
                                                                   torch.float32),
                                                 rounds=rounds, warmup=1))
                for m, n in ns_shapes for algorithm in ("gram", "standard")]
        if not (bf16_is_native() if with_peer is None else with_peer):
            # bf16 is emulated here (torch.optim.Muon's bf16 steps would take minutes): the peer
            # computes its Newton-Schulz in float32, the dtype "auto" picks here
            return rows + float32_step_rows(shapes, rounds)
        peer_rows = [("full step, bf16 NS, same settings", PEER, _bf16_step, SETTINGS),
                     ("full step, bf16 NS, our defaults (QKV split, gram)", PEER,
                      _bf16_step, SETTINGS.replace(split_qkv=True, ns_algorithm="gram")),
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
    iteration on `NS_SHAPES`, then our step and the peer pair's on GPT-2 small (`gpt2_shapes()`):
    where bf16 is native, in bf16 (and both Newton-Schulz alone), elsewhere with float32
    Newton-Schulz on both sides."""
    return compare_on(gpt2_shapes(), rounds, threads)
