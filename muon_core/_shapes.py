"""Parameter shapes of reference models, in torch layout (Linear weights are (out, in))."""

from __future__ import annotations


def gpt2_shapes(n_layer: int = 12, d_model: int = 768, vocab: int = 50257,
                context: int = 1024) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a GPT-2 model (default: GPT-2 small, 124M parameters)."""
    d, shapes = d_model, {"wte.weight": (vocab, d_model), "wpe.weight": (context, d_model)}
    for i in range(n_layer):
        p = f"h.{i}."
        shapes |= {p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
                   p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
                   p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
                   p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
                   p + "mlp.fc.weight": (4 * d, d), p + "mlp.fc.bias": (4 * d,),
                   p + "mlp.proj.weight": (d, 4 * d), p + "mlp.proj.bias": (d,)}
    return shapes | {"ln_f.weight": (d,), "ln_f.bias": (d,), "lm_head.weight": (vocab, d)}
