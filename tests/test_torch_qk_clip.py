"""QK-clip in muon_torch: `record_qk_max` in forward and `Muon.qk_clip` after the step."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import muon_core  # noqa: E402
from muon_core import MuonConfig  # noqa: E402
from muon_torch import Muon, record_qk_max  # noqa: E402
from qk_clip_cases import all_cases, clip_and_check, separate  # noqa: E402
from torch import nn  # noqa: E402
from torch_helpers import one_thread  # noqa: E402, F401

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_thread")]
TORCH_CASES = [c for c in all_cases() if c.layout == "out_in"]


def _torch_clip(params, qk_max, config, layout):
    assert layout == "out_in"
    named = [(n, nn.Parameter(torch.tensor(p))) for n, p in params.items()]
    opt = Muon(named, config)
    opt.qk_clip({layer: torch.tensor(s) for layer, s in qk_max.items()})
    return {n: p.detach().numpy() for n, p in named}


@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.name)
def test_clipped_logits_reach_tau_per_head(case):
    clip_and_check(case, _torch_clip)


class Attention(nn.Module):
    """Causal grouped-query attention that records its largest logit per head."""

    def __init__(self, dim=16, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x, qk_max, name="attn"):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, -1).transpose(1, 2)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        record_qk_max(qk_max, name, q, k, mask=causal)
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                         enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def _explicit_max(model, x):
    """Each query head's largest causal logit, head by head from the weights."""
    d = model.head_dim
    q = x @ model.q_proj.weight.T + model.q_proj.bias
    k = x @ model.k_proj.weight.T + model.k_proj.bias
    out = []
    for h in range(model.heads):
        j = h // (model.heads // model.kv_heads)
        logits = q[..., h * d:(h + 1) * d] @ k[..., j * d:(j + 1) * d].transpose(-1, -2)
        mask = torch.ones(logits.shape[-2:], dtype=torch.bool).tril()
        out.append(logits.masked_fill(~mask, -math.inf).max() / math.sqrt(d))
    return torch.stack(out)


def test_record_qk_max_keeps_the_running_maximum():
    torch.manual_seed(0)
    model = Attention()
    x1, x2 = torch.randn(2, 5, 16), 3 * torch.randn(2, 5, 16)
    store = {}
    first = model(x1, store).detach() is not None and store["attn"].clone()
    model(x2, store)
    torch.testing.assert_close(first, _explicit_max(model, x1).detach())
    torch.testing.assert_close(store["attn"], torch.maximum(_explicit_max(model, x1),
                                                            _explicit_max(model, x2)).detach())
    assert not store["attn"].requires_grad


def test_step_then_clip_caps_the_recorded_logits():
    # Large weights make every head's logit exceed tau; after the clip the same inputs give
    # tau for the largest head of each key group (a zero-lr step first, as in training).
    torch.manual_seed(1)
    model = nn.ModuleDict({"attn": Attention()})
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    config = MuonConfig(lr=0.0, weight_decay=0.0, ns_dtype="float32",
                        adamw={"lr": 0.0, "weight_decay": 0.0}, qk_clip={"threshold": 2.0})
    opt = Muon.for_model(model, config)
    x, store = torch.randn(3, 6, 16), {}
    model["attn"](x, store).square().mean().backward()
    before = store["attn"].clone()
    opt.step()
    opt.qk_clip(store)
    after = _explicit_max(model["attn"], x).detach()
    for group in range(2):
        b, a = before[2 * group:2 * group + 2], after[2 * group:2 * group + 2]
        if b.max() > 2.0:
            assert a.max().item() == pytest.approx(2.0, rel=1e-5)
        else:
            torch.testing.assert_close(a, b)


def test_matches_the_core_reference_in_float32():
    case = separate(4, 2, bias=True)
    rng = np.random.default_rng(5)
    params = {n: p.astype(np.float32) for n, p in case.pack(
        __import__("qk_clip_cases").random_heads(case, rng)).items()}
    qk_max = {"attn": np.array([5.0, 0.1, 3.0, 0.2], dtype=np.float32)}
    want = muon_core.qk_clip(params, qk_max, case.config)
    got = _torch_clip(params, qk_max, case.config, "out_in")
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6)


def test_nonfinite_logits_raise_and_change_nothing():
    case = separate(2, 2)
    named = [(n, nn.Parameter(torch.ones(p.shape))) for n, p in case.pack(
        __import__("qk_clip_cases").random_heads(case, np.random.default_rng(0))).items()]
    opt = Muon(named, case.config)
    with pytest.raises(ValueError, match=r"qk_max\['attn'\] holds NaN"):
        opt.qk_clip({"attn": torch.tensor([5.0, float("inf")])})
    assert all(bool((p == 1).all()) for _, p in named)
    with pytest.raises(ValueError, match="QK-clip is off"):
        Muon(named, MuonConfig()).qk_clip({"attn": torch.tensor([5.0, 1.0])})


@pytest.mark.slow
def test_demo_caps_what_plain_muon_lets_grow(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "examples" / "qk_clip_demo.py"
    curves, plot = tmp_path / "curves.json", tmp_path / "qk.png"
    done = subprocess.run([sys.executable, str(demo), "--steps", "80", "--json", str(curves),
                           "--plot", str(plot)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    plain, step_clip, after_clip = json.loads(curves.read_text()).values()
    # tau = 30: plain Muon passes 2 tau within 80 steps; clipping with the logits measured
    # again after the update hands back weights whose logits on the step's batch are at most
    # tau (up to float32 rounding), which the demo itself also checks.
    assert max(plain["max_logit"]) > 60.0
    assert max(after_clip["after_step"]) <= 30.0 * (1 + 1e-5)
    assert max(step_clip["max_logit"]) < 45.0
    assert plot.stat().st_size > 0
