"""QK-clip demonstration: a small character transformer trained with Muon at a learning rate
high enough that its attention logits keep growing, with and without QK-clip.

Three runs start from the same weights and see the same batches: plain Muon; QK-clip with the
largest logits of the step's forward pass (`muon_torch.record_qk_max`), applied to the updated
weights (`Muon.qk_clip`); and QK-clip with the largest logits measured again on the updated
weights, on the step's batch, one layer at a time (`clip_after_update`). Each step records the
largest logit of the forward pass, and the largest logit of the weights the step hands back
(after the update and the clip) on the step's batch. Prints both and the losses, plots them,
and exits with an error unless the last run's handed-back weights keep every logit of their
batch at or below tau.

    python examples/qk_clip_demo.py [--steps 200] [--lr 0.1] [--tau 30] [--plot FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
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


ROUNDING = 1e-5  # float32: gamma ** alpha * gamma ** (1 - alpha) * S may land just above tau


def train(config: MuonConfig, steps: int, clip: str = "none", seed: int = 0) -> dict:
    """Train from seeded weights on seeded batches with QK-clip `clip` ("none"; "step": the
    forward pass's logits; "after": `clip_after_update`). Returns the per-step largest logit
    of the forward pass and of the weights handed back (on the step's batch), the loss, and
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
        if clip == "step":
            opt.qk_clip(qk_max)
        elif clip == "after":
            clip_after_update(model, opt, batch, list(qk_max))
        after_step.append(largest_logit(model, batch))
    eval_rng = np.random.default_rng(1234)
    with torch.no_grad():
        held_out = float(np.mean([float(loss_of(model, *char_windows(ids[split:], CONTEXT, 64,
                                                                      eval_rng), {}))
                                  for _ in range(8)]))
    return {"max_logit": max_logit, "after_step": after_step, "loss": losses,
            "held_out_loss": held_out}


def logits_of(model: TinyGPT, batch: tuple) -> dict:
    """Each layer's largest logit per head in one fresh forward pass on `batch`."""
    qk_max: dict = {}
    with torch.no_grad():
        loss_of(model, *batch, qk_max)
    return qk_max


def largest_logit(model: TinyGPT, batch: tuple) -> float:
    """The largest logit of one fresh forward pass on `batch` with the current weights."""
    return max(float(s.max()) for s in logits_of(model, batch).values())


def clip_after_update(model: TinyGPT, opt: Muon, batch: tuple, layers: list[str]) -> None:
    """QK-clip with the logits of the updated weights on `batch`, layer by layer in forward
    order. Clipping a layer changes the inputs of the layers after it, never its own, so
    afterwards every head's largest logit on `batch` is at most tau (one forward pass per
    layer, without gradient)."""
    for layer in layers:
        opt.qk_clip({layer: logits_of(model, batch)[layer]})


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
    clipped = base.replace(qk_clip={"threshold": args.tau, "alpha": 0.5})
    labels = {"none": "Muon", "step": "QK-clip, forward-pass logits",
              "after": "QK-clip, logits re-measured after the update"}
    runs = {}
    for clip, label in labels.items():
        start = time.perf_counter()
        r = runs[label] = train(base if clip == "none" else clipped, args.steps, clip)
        print(f"{label} ({time.perf_counter() - start:.0f} s)\n  largest logit, forward pass: "
              f"{summary(r['max_logit'], args.tau)}\n  largest logit, weights handed back: "
              f"{summary(r['after_step'], args.tau)}\n  train loss (last 20 steps) "
              f"{np.mean(r['loss'][-20:]):.4f}, held-out loss {r['held_out_loss']:.4f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(runs, f)
    if args.plot:
        plot(runs, args.tau, args.lr, args.plot)
        print(f"wrote {args.plot}")
    after = runs[labels["after"]]
    print(f"{labels['after']}: the forward pass of step t+1 over the weights handed back at step "
          f"t, on their own batch: {next_batch_spread(after)}")
    peak = max(after["after_step"])
    if peak > args.tau * (1 + ROUNDING):
        sys.exit(f"the weights handed back reached a logit of {peak:.4f} > tau = {args.tau:g}")


def summary(curve: list, tau: float) -> str:
    """Peak, median over the second half, last value, and steps above tau (beyond float32
    rounding) of a curve."""
    half = len(curve) // 2
    return (f"peak {max(curve):.2f}, median of steps {half}-{len(curve) - 1} "
            f"{np.median(curve[half:]):.2f}, last {curve[-1]:.2f}, above tau in "
            f"{sum(s > tau * (1 + ROUNDING) for s in curve)} of {len(curve)} steps")


def next_batch_spread(run: dict) -> str:
    """Median, 95th percentile and largest ratio of each step's forward-pass logit to the
    previous step's handed-back one: the same weights, on the next batch."""
    ratio = np.array(run["max_logit"][1:]) / np.array(run["after_step"][:-1])
    median, p95 = np.percentile(ratio, [50, 95])
    return f"median {median:.2f}, 95th percentile {p95:.2f}, largest {ratio.max():.2f} times"


def plot(runs: dict, tau: float, lr: float, path: str) -> None:
    """Max logit per step of each run, with tau as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, run in runs.items():
        line, = ax.plot(run["max_logit"], linewidth=1, label=f"{label}: forward pass")
        if "QK-clip" in label:
            ax.plot(run["after_step"], color=line.get_color(), linestyle=":",
                    label=f"{label}: weights handed back, step's batch")
    ax.axhline(tau, color="grey", linestyle="--", linewidth=1, label=f"tau = {tau:g}")
    ax.set(xlabel="step", ylabel="largest attention logit", yscale="log",
           title=f"2-layer char transformer, Muon lr={lr:g}, no weight decay")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
