"""Small PyTorch models for the demo, the examples and `muon plan`.

Parameter names follow GPT-2 and torchvision habits (wte, wpe, attn.qkv, lm_head, classifier),
so the default routing recognises embeddings and heads by name as well as by module type.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class DigitsMLP(nn.Module):
    """An MLP for 8x8 digits: two hidden layers (Muon) and a `head` (AdamW)."""

    def __init__(self, width: int = 256, n_in: int = 64, n_out: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(n_in, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of flattened images."""
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class DigitsCNN(nn.Module):
    """A torchvision-style CNN for 8x8 digits: conv features, a hidden `fc`, a `classifier`."""

    def __init__(self, channels: int = 32, hidden: int = 128, n_out: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(2 * channels)
        self.fc = nn.Linear(2 * channels * 16, hidden)
        self.classifier = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images shaped (batch, 64) or (batch, 1, 8, 8)."""
        x = x.reshape(-1, 1, 8, 8)
        x = F.max_pool2d(F.relu(self.bn(self.conv2(F.relu(self.conv1(x))))), 2)
        return self.classifier(F.relu(self.fc(x.flatten(1))))


class Block(nn.Module):
    """A pre-norm transformer block with a fused `attn.qkv` projection."""

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(d_model, 3 * d_model),
                                   "proj": nn.Linear(d_model, d_model)})
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = nn.ModuleDict({"fc": nn.Linear(d_model, 4 * d_model),
                                  "proj": nn.Linear(4 * d_model, d_model)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Causal self-attention then the MLP, each with a residual connection."""
        b, t, d = x.shape
        q, k, v = self.attn["qkv"](self.ln_1(x)).split(d, dim=2)
        heads = [z.reshape(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v)]
        y = F.scaled_dot_product_attention(*heads, is_causal=True)
        x = x + self.attn["proj"](y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp["proj"](F.gelu(self.mlp["fc"](self.ln_2(x))))


class CharGPT(nn.Module):
    """A GPT-style character model: `wte`, `wpe`, blocks `h.N`, `ln_f`, `lm_head`."""

    def __init__(self, vocab: int = 96, context: int = 64, d_model: int = 128,
                 n_layer: int = 2, n_head: int = 4):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is invalid: expected a multiple of {n_head=}")
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(context, d_model)
        self.h = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-character logits for a batch of index sequences (batch, time)."""
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


BUILDERS = {"mlp": DigitsMLP, "cnn": DigitsCNN, "gpt-small": CharGPT}


def build(name: str) -> nn.Module:
    """A fresh model by built-in name (see `BUILDERS`)."""
    if name not in BUILDERS:
        raise ValueError(f"model={name!r} is not a built-in torch model: expected one of "
                         f"{sorted(BUILDERS)}")
    return BUILDERS[name]()
