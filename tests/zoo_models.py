"""The model zoo: tiny configurations of real architectures, built without downloading weights.

Each builder returns a model whose parameter names and layouts are the library's own; the sizes
are small (and distinct, so a wrong axis shows) to keep the tests fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ZOO = Path(__file__).parent / "zoo"
# Small sizes shared by the text models: hidden 64, 4 query heads of 16, 2 key/value heads.
TEXT = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
            num_attention_heads=4, max_position_embeddings=32)


def _hf(config_name: str, model_name: str, **config: Any) -> Any:
    transformers = __import__("transformers")
    cfg = getattr(transformers, config_name)(**config)
    return getattr(transformers, model_name)(cfg)


def torch_zoo() -> dict[str, Any]:
    """name -> builder of a torch model (transformers)."""
    return {
        "gpt2": lambda: _hf("GPT2Config", "GPT2LMHeadModel", vocab_size=96, n_positions=32,
                            n_embd=64, n_layer=1, n_head=4),
        "llama": lambda: _hf("LlamaConfig", "LlamaForCausalLM", **TEXT,
                             num_key_value_heads=2),
        "qwen2_gqa": lambda: _hf("Qwen2Config", "Qwen2ForCausalLM", **TEXT,
                                 num_key_value_heads=2, tie_word_embeddings=True),
        "gpt_neox": lambda: _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", **TEXT),
        "falcon": lambda: _hf("FalconConfig", "FalconForCausalLM", vocab_size=96,
                              hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                              num_kv_heads=2, new_decoder_architecture=True),
        "mixtral": lambda: _hf("MixtralConfig", "MixtralForCausalLM", **TEXT,
                               num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2),
        "deepseek_v3": lambda: _hf("DeepseekV3Config", "DeepseekV3ForCausalLM", vocab_size=96,
                                   hidden_size=64, intermediate_size=160,
                                   moe_intermediate_size=48, num_hidden_layers=2,
                                   first_k_dense_replace=1, num_attention_heads=4,
                                   num_key_value_heads=4, n_routed_experts=4, n_group=2,
                                   topk_group=1, num_experts_per_tok=2, n_shared_experts=1,
                                   q_lora_rank=24, kv_lora_rank=32, qk_rope_head_dim=8,
                                   qk_nope_head_dim=16, v_head_dim=16,
                                   max_position_embeddings=32),
        "bert_seq_cls": lambda: _hf("BertConfig", "BertForSequenceClassification",
                                    **TEXT, num_labels=3),
        "t5": lambda: _hf("T5Config", "T5ForConditionalGeneration", vocab_size=96, d_model=64,
                          d_kv=16, d_ff=160, num_layers=1, num_decoder_layers=1, num_heads=4),
        "vit": lambda: _hf("ViTConfig", "ViTForImageClassification", hidden_size=64,
                           intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8, num_labels=10),
        "clip": lambda: _hf("CLIPConfig", "CLIPModel", projection_dim=48,
                            text_config=dict(vocab_size=96, hidden_size=64,
                                             intermediate_size=160, num_hidden_layers=1,
                                             num_attention_heads=4, max_position_embeddings=32),
                            vision_config=dict(hidden_size=80, intermediate_size=192,
                                               num_hidden_layers=1, num_attention_heads=4,
                                               image_size=32, patch_size=8)),
        "whisper": lambda: _hf("WhisperConfig", "WhisperForConditionalGeneration",
                               vocab_size=96, d_model=64, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=4, decoder_attention_heads=4,
                               encoder_ffn_dim=160, decoder_ffn_dim=160, num_mel_bins=16,
                               max_source_positions=24, max_target_positions=32,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               decoder_start_token_id=1),
        "mamba": lambda: _hf("MambaConfig", "MambaForCausalLM", vocab_size=96, hidden_size=64,
                             state_size=8, num_hidden_layers=1, expand=2, conv_kernel=4),
        "resnet": lambda: _hf("ResNetConfig", "ResNetForImageClassification",
                              embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                              layer_type="bottleneck", num_labels=10),
        "convnext": lambda: _hf("ConvNextConfig", "ConvNextForImageClassification",
                                num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                                num_labels=10),
    }


def expected(name: str) -> dict[str, Any]:
    """The reviewed expectation of one zoo model."""
    return json.loads((ZOO / f"{name}.json").read_text(encoding="utf-8"))


def describe(entry: Any) -> dict[str, Any]:
    """The parts of a plan entry the zoo files record."""
    if not entry.is_muon:
        return {"algorithm": "adamw", "decided_by": entry.decided_by}
    out = {"algorithm": "muon", "decided_by": entry.decided_by,
           "matrix": list(entry.matrix_shape), "perm": list(entry.perm),
           "lr_scale": [round(s, 4) for s in entry.lr_scales]}
    if len(entry.blocks) > 1:
        out["split"] = list(entry.blocks)
    if entry.groups > 1:
        out["groups"] = entry.groups
    return out


def _zeros(tree: Any) -> Any:
    """Zero arrays in place of the shapes of an abstract pytree (nothing is computed)."""
    import jax
    import numpy as np

    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)


def _abstract_init(module: Any, x: Any) -> Any:
    """A linen module's parameters as zero arrays of the right shapes, without running it."""
    import jax

    return _zeros(jax.eval_shape(module.init, jax.random.key(0), x))


def _linen_gpt():
    import jax.numpy as jnp
    from flax import linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x + nn.SelfAttention(num_heads=4)(nn.LayerNorm()(x))
            return x + nn.Dense(64)(nn.gelu(nn.Dense(160)(nn.LayerNorm()(x))))

    class GPT(nn.Module):
        @nn.compact
        def __call__(self, ids):
            pos = self.param("pos_embedding", nn.initializers.normal(0.02), (32, 64))
            x = nn.Embed(96, 64)(ids) + pos[: ids.shape[1]]
            x = Block()(Block()(x))
            return nn.Dense(96, use_bias=False)(nn.LayerNorm()(x))

    return _abstract_init(GPT(), jnp.zeros((1, 8), jnp.int32))


def _linen_mlp():
    import jax.numpy as jnp
    from flax import linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for width in (64, 64, 64):
                x = nn.relu(nn.Dense(width)(x))
            return nn.Dense(1000)(x)

    return _abstract_init(MLP(), jnp.zeros((1, 32)))


def _nnx_gpt():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln1, self.ln2 = nnx.LayerNorm(64, rngs=rngs), nnx.LayerNorm(64, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(4, 64, decode=False, rngs=rngs)
            self.fc, self.proj = nnx.Linear(64, 160, rngs=rngs), nnx.Linear(160, 64, rngs=rngs)

    class GPT(nnx.Module):
        def __init__(self, rngs):
            self.tok_emb = nnx.Embed(96, 64, rngs=rngs)
            self.blocks = nnx.List([Block(rngs) for _ in range(2)])
            self.ln_f = nnx.LayerNorm(64, rngs=rngs)
            self.lm_head = nnx.Linear(64, 96, use_bias=False, rngs=rngs)

    return _zeros(nnx.state(nnx.eval_shape(lambda: GPT(nnx.Rngs(0))), nnx.Param))


def _equinox_mlp():
    import equinox as eqx
    import jax

    mlp = eqx.filter_eval_shape(eqx.nn.MLP, 32, 1000, 64, depth=3, key=jax.random.key(0))
    return _zeros(eqx.filter(mlp, lambda x: isinstance(x, jax.ShapeDtypeStruct)))


def jax_zoo() -> dict[str, tuple[Any, str]]:
    """name -> (builder of a parameter pytree, its layout)."""
    return {"flax_linen_gpt": (_linen_gpt, "in_out"), "flax_linen_mlp": (_linen_mlp, "in_out"),
            "flax_nnx_gpt": (_nnx_gpt, "in_out"), "equinox_mlp": (_equinox_mlp, "out_in")}
