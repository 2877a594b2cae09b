"""QK-clip demonstration: a small character transformer trained with Muon at a learning rate
high enough that its attention logits keep growing, with and without QK-clip.

Both runs start from the same weights and see the same batches. Each step records the largest
pre-softmax logit of every head (`muon_torch.record_qk_max`); with QK-clip the optimizer then
scales down the query and key weights of the heads above tau (`Muon.qk_clip`). After the step
(and the clip) one more forward pass on the same batch measures the largest logit of the new
weights. Prints the largest logit and the loss of both runs and plots the largest logit per
step.

    python examples/qk_clip_demo.py [--steps 200] [--lr 0.1] [--tau 30] [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from muon_cli.data import VOCAB, char_windows, encode_chars, python_source_text
from muon_core import MuonConfig
from muon_torch import Muon, record_qk_max

CONTEXT = 32


class Block(nn.Module):
    """A pre-norm transformer block whose attention records its largest logit per head."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(d_model, 3 * d_model),
                                   "proj": nn.Linear(d_model, d_model)})
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor, qk_max: dict, name: str) -> torch.Tensor:
        """Causal self-attention then the MLP; records into `qk_max[name + ".attn"]`."""
        b, t, d = x.shape
        q, k, v = (z.reshape(b, t, self.n_head, -1).transpose(1, 2)
                   for z in self.attn["qkv"](self.ln_1(x)).split(d, dim=2))
        record_qk_max(qk_max, f"{name}.attn", q, k, mask=torch.ones(t, t, dtype=torch.bool).tril())
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn["proj"](y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """Embeddings, `n_layer` blocks `h.N`, a final norm and the output head."""

    def __init__(self, context: int = CONTEXT, d_model: int = 64, n_layer: int = 2, n_head: int = 4):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, d_model), nn.Embedding(context, d_model)
        self.h = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(d_model), nn.Linear(d_model, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor, qk_max: dict) -> torch.Tensor:
        """Next-character logits; every block records its attention logits into `qk_max`."""
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for i, block in enumerate(self.h):
            x = block(x, qk_max, f"h.{i}")
        return self.lm_head(self.ln_f(x))


def loss_of(model: TinyGPT, x: np.ndarray, y: np.ndarray, qk_max: dict) -> torch.Tensor:
    logits = model(torch.from_numpy(x), qk_max)
    return F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).flatten())


def train(config: MuonConfig, steps: int, seed: int = 0) -> dict:
    """Train from seeded weights on seeded batches; return per-step max logit and loss, and
    the held-out loss at the end."""
    torch.manual_seed(seed)
    ids = encode_chars(python_source_text())
    split = int(0.9 * len(ids))
    model = TinyGPT()
    opt = Muon.for_model(model, config)
    rng = np.random.default_rng(seed)
    max_logit, after_step, losses = [], [], []
    for _ in range(steps):
        qk_max: dict = {}
        batch = char_windows(ids[:split], CONTEXT, 32, rng)
        loss = loss_of(model, *batch, qk_max)
        opt.zero_grad()
        loss.backward()
        opt.step()
        max_logit.append(max(float(s.max()) for s in qk_max.values()))
        losses.append(loss.item())
        if config.qk_clip is not None:
            opt.qk_clip(qk_max)
        after_step.append(largest_logit(model, batch))
    eval_rng = np.random.default_rng(1234)
    with torch.no_grad():
        held_out = float(np.mean([float(loss_of(model, *char_windows(ids[split:], CONTEXT, 64,
                                                                      eval_rng), {}))
                                  for _ in range(8)]))
    return {"max_logit": max_logit, "after_step": after_step, "loss": losses,
            "held_out_loss": held_out}


def largest_logit(model: TinyGPT, batch: tuple) -> float:
    """The largest logit of one fresh forward pass on `batch` with the current weights."""
    qk_max: dict = {}
    with torch.no_grad():
        loss_of(model, *batch, qk_max)
    return max(float(s.max()) for s in qk_max.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--tau", type=float, default=30.0)
    parser.add_argument("--plot", default="docs/img/qk_clip.png")
    parser.add_argument("--json", default=None, help="also write the curves to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = MuonConfig(lr=args.lr, weight_decay=0.0, ns_dtype="float32",
                      adamw={"lr": 3e-3, "weight_decay": 0.0})
    runs = {}
    for label, config in (("Muon", base),
                          (f"Muon + QK-clip (tau={args.tau:g})",
                           base.replace(qk_clip={"threshold": args.tau, "alpha": 0.5}))):
        start = time.perf_counter()
        runs[label] = train(config, args.steps)
        r = runs[label]
        print(f"{label:28s} max logit: peak {max(r['max_logit']):8.2f}, last "
              f"{r['max_logit'][-1]:8.2f}, after step+clip peak {max(r['after_step']):8.2f} "
              f"median {np.median(r['after_step'][50:]):8.2f} | train loss (last 20 steps) "
              f"{np.mean(r['loss'][-20:]):.4f} | held-out loss {r['held_out_loss']:.4f} "
              f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(runs, f)
    if args.plot:
        plot(runs, args.tau, args.lr, args.plot)
        print(f"wrote {args.plot}")


def plot(runs: dict, tau: float, lr: float, path: str) -> None:
    """Max logit per step of each run, with tau as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, run in runs.items():
        line, = ax.plot(run["max_logit"], label=f"{label}: recorded in the forward pass")
        if "QK-clip" in label:
            ax.plot(run["after_step"], color=line.get_color(), linestyle=":",
                    label=f"{label}: same batch after the step and clip")
    ax.axhline(tau, color="grey", linestyle="--", linewidth=1, label=f"tau = {tau:g}")
    ax.set(xlabel="step", ylabel="largest attention logit", yscale="log",
           title=f"2-layer char transformer, Muon lr={lr:g}, no weight decay")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
