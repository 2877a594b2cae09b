"""The routing plan: defaults, layouts, rules, groups, splits, dimension numbers, errors."""

import math

import numpy as np
import pytest

from muon_core import MuonConfig, Rule, from_matrices, lr_scale, plan, to_matrices

from muon_cli.benchtools import gpt2_shapes


def small_gpt(layout="out_in", d=64, vocab=100, n_layer=2):
    def linear(out, inp):
        return (out, inp) if layout == "out_in" else (inp, out)
    shapes = {"tok_embeddings.weight": (vocab, d), "pos_embedding": (32, d)}
    for i in range(n_layer):
        shapes |= {f"blocks.{i}.ln1.weight": (d,), f"blocks.{i}.attn.qkv.weight": linear(3 * d, d),
                   f"blocks.{i}.attn.proj.weight": linear(d, d),
                   f"blocks.{i}.mlp.fc.weight": linear(4 * d, d),
                   f"blocks.{i}.mlp.fc.bias": (4 * d,),
                   f"blocks.{i}.mlp.proj.weight": linear(d, 4 * d)}
    return shapes | {"ln_f.weight": (d,), "lm_head.weight": linear(vocab, d)}


def test_small_gpt_reads_right():
    p = plan(small_gpt())
    muon = {e.name for e in p.muon}
    assert muon == {f"blocks.{i}.{m}.weight" for i in range(2)
                    for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert p["tok_embeddings.weight"].decided_by == "name"
    assert p["lm_head.weight"].why == "output head by name ('lm_head')"
    assert p["blocks.0.mlp.fc.bias"].decided_by == "shape"
    qkv = p["blocks.0.attn.qkv.weight"]
    assert qkv.blocks == (64, 64, 64) and qkv.lr_scales == (1.0, 1.0, 1.0)
    fc = p["blocks.0.mlp.fc.weight"]
    assert fc.matrix_shape == (1, 256, 64) and fc.lr_scales == (2.0,)  # sqrt(256/64)
    assert p["blocks.0.mlp.proj.weight"].lr_scales == (1.0,)  # max(1, 64/256)
    table = str(p)
    assert "blocks.0.attn.qkv.weight" in table and "split 64+64+64" in table
    assert table.splitlines()[-1].startswith("8 of 16 tensors")


def test_gpt2_small_routes_embeddings_and_head_to_adamw():
    p = plan(gpt2_shapes())
    assert len(p.muon) == 48
    assert {e.name for e in p.adamw if len(e.shape) == 2} == {"wte.weight", "wpe.weight",
                                                             "lm_head.weight"}


def test_small_cnn_flattens_conv_kernels():
    shapes = {"conv1.weight": (32, 3, 3, 3), "conv1.bias": (32,), "bn1.weight": (32,),
              "conv2.weight": (64, 32, 3, 3), "fc.weight": (10, 64 * 4)}
    p = plan(shapes)
    assert p["conv1.weight"].matrix_shape == (1, 32, 27)
    assert p["conv1.weight"].lr_scales == (math.sqrt(32 / 27),)
    assert p["conv2.weight"].matrix_shape == (1, 64, 288)
    assert p["fc.weight"].is_muon and not p["conv1.bias"].is_muon


def test_flax_layout_gives_the_same_scales_as_torch_layout():
    torch_plan, flax_plan = plan(small_gpt("out_in")), plan(small_gpt("in_out"), layout="in_out")
    for t, f in zip(torch_plan, flax_plan):
        assert (t.algorithm, t.lr_scales, t.blocks) == (f.algorithm, f.lr_scales, f.blocks), t.name
        assert t.matrix_shape == f.matrix_shape
    flax_conv = plan({"Conv_0.kernel": (3, 3, 3, 32)}, layout="in_out")["Conv_0.kernel"]
    assert flax_conv.perm == (3, 0, 1, 2) and flax_conv.matrix_shape == (1, 32, 27)


def test_flax_embed_is_recognised_by_name():
    p = plan({"params.Embed_0.embedding": (100, 16), "params.Dense_0.kernel": (16, 32)},
             layout="in_out")
    assert not p["params.Embed_0.embedding"].is_muon
    assert p["params.Dense_0.kernel"].is_muon


def test_decision_layers_most_explicit_first():
    shapes = {"encoder.layer.weight": (8, 8), "head.weight": (4, 8), "output_proj.weight": (8, 8)}
    cfg = MuonConfig(rules=[Rule(match="head.*", algorithm="muon"),
                            Rule(match="encoder.*", algorithm="adamw")])
    p = plan(shapes, cfg, algorithms={"encoder.layer.weight": "muon"},
             module_kinds={"output_proj.weight": "head"})
    assert (p["encoder.layer.weight"].algorithm, p["encoder.layer.weight"].decided_by) == \
        ("muon", "group")
    assert (p["head.weight"].algorithm, p["head.weight"].decided_by) == ("muon", "rule")
    assert (p["output_proj.weight"].algorithm, p["output_proj.weight"].decided_by) == \
        ("adamw", "module")


def test_rules_can_filter_by_ndim_and_shape():
    cfg = MuonConfig(rules=[Rule(match="*", shape=(10, 10), algorithm="adamw")])
    p = plan({"a": (10, 10), "b": (10, 12)}, cfg)
    assert not p["a"].is_muon and p["b"].is_muon


def test_gqa_split_and_turning_the_default_split_off():
    cfg = MuonConfig(rules=[Rule(match="*.wqkv", split=(64, 16, 16))])
    entry = plan({"layers.0.wqkv": (96, 64)}, cfg)["layers.0.wqkv"]
    assert entry.blocks == (64, 16, 16) and entry.block_offsets == (0, 64, 80)
    assert entry.lr_scales == (1.0, 1.0, 1.0)
    off = plan({"attn.qkv.weight": (96, 32)}, MuonConfig(split_qkv=False))["attn.qkv.weight"]
    assert off.blocks == (96,) and off.lr_scales == (math.sqrt(3),)


def test_dimension_numbers_give_batch_axes():
    # MoE experts (E, out, in): each expert is its own matrix.
    cfg = MuonConfig(rules=[Rule(match="*.experts", out_axes=(1,), in_axes=(2,))])
    e = plan({"moe.experts": (4, 32, 16)}, cfg)["moe.experts"]
    assert e.perm == (0, 1, 2) and e.matrix_shape == (4, 32, 16)
    # flax DenseGeneral per-head kernel (in, heads, head_dim), heads as batch axis.
    cfg = MuonConfig(rules=[Rule(match="*.query.kernel", out_axes=(-1,), in_axes=(0,))])
    q = plan({"attn.query.kernel": (64, 4, 16)}, cfg, layout="in_out")["attn.query.kernel"]
    assert q.perm == (1, 2, 0) and q.matrix_shape == (4, 16, 64)


@pytest.mark.parametrize("rows, cols, scaling, expected", [
    (256, 64, "original", 2.0), (64, 256, "original", 1.0),
    (256, 64, "match_rms_adamw", 0.2 * 16), (64, 256, "spectral", 0.5), (64, 256, "none", 1.0),
])
def test_lr_scale_formulas(rows, cols, scaling, expected):
    assert lr_scale(rows, cols, scaling) == pytest.approx(expected)


def test_errors_name_parameter_shape_and_expectation():
    with pytest.raises(ValueError, match=r"'b' with shape \(8,\) is routed to muon by rule"):
        plan({"b": (8,)}, MuonConfig(rules=[Rule(match="b", algorithm="muon")]))
    with pytest.raises(ValueError, match=r"split=\(4, 4\) sums to 8, expected the output size 12"):
        plan({"w": (12, 4)}, MuonConfig(rules=[Rule(match="w", split=(4, 4))]))
    with pytest.raises(ValueError, match=r"out_axes=\(5,\) is invalid for a 3-D tensor"):
        plan({"w": (2, 3, 4)}, MuonConfig(rules=[Rule(match="w", out_axes=(5,), in_axes=(0,))]))
    with pytest.raises(ValueError, match="algorithm='sgd'"):
        plan({"w": (2, 3)}, algorithms={"w": "sgd"})
    with pytest.raises(ValueError, match="layout='io'"):
        plan({"w": (2, 3)}, layout="io")
    with pytest.raises(KeyError, match="no parameter named 'x'"):
        plan({"w": (2, 3)})["x"]


# -- real architectures: names and shapes as the libraries write them ---------------------------
def test_hf_gpt2_conv1d_weights_are_read_in_out():
    # Hugging Face GPT-2 stores Conv1D weights (in, out): c_attn (768, 2304), c_fc (768, 3072).
    shapes = {"transformer.wte.weight": (50257, 768), "transformer.wpe.weight": (1024, 768),
              "transformer.h.0.attn.c_attn.weight": (768, 2304),
              "transformer.h.0.attn.c_proj.weight": (768, 768),
              "transformer.h.0.mlp.c_fc.weight": (768, 3072),
              "transformer.h.0.mlp.c_proj.weight": (3072, 768),
              "lm_head.weight": (50257, 768)}
    p = plan(shapes)
    qkv = p["transformer.h.0.attn.c_attn.weight"]
    assert qkv.perm == (1, 0) and qkv.matrix_shape == (1, 2304, 768)
    assert qkv.blocks == (768, 768, 768)
    assert p["transformer.h.0.mlp.c_fc.weight"].lr_scales == (2.0,)  # sqrt(3072 / 768)
    assert p["transformer.h.0.mlp.c_proj.weight"].matrix_shape == (1, 768, 3072)
    assert {e.name for e in p.adamw} == {"transformer.wte.weight", "transformer.wpe.weight",
                                         "lm_head.weight"}
    # nanoGPT: the same names on nn.Linear (out, in) keep the torch layout.
    nano = plan({"h.0.attn.c_attn.weight": (2304, 768), "h.0.mlp.c_fc.weight": (3072, 768)})
    assert nano["h.0.attn.c_attn.weight"].perm == (0, 1)
    assert nano["h.0.mlp.c_fc.weight"].lr_scales == (2.0,)


def test_rule_layout_reads_one_tensor_in_out():
    cfg = MuonConfig(rules=[Rule(match="*.w_in", layout="in_out")])
    p = plan({"blk.w_in": (16, 64), "blk.w_out": (16, 64)}, cfg)
    assert p["blk.w_in"].matrix_shape == (1, 64, 16) and p["blk.w_in"].lr_scales == (2.0,)
    assert p["blk.w_out"].matrix_shape == (1, 16, 64)


def test_interleaved_qkv_is_left_whole_and_says_which_rule_to_write():
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    entry = plan({name: (96, 32)})[name]
    assert entry.blocks == (96,) and entry.is_muon
    assert "groups" in entry.flags[0] and "split" in entry.flags[0]
    assert f"! {name}: fused Q/K/V left whole" in str(plan({name: (96, 32)}))


def test_interleaved_qkv_split_by_heads_or_rule_takes_the_right_rows():
    # GPT-NeoX, 2 heads of size 2, d = 3: rows per head are [q0 q1 k0 k1 v0 v1], so Q holds
    # rows {0, 1, 6, 7}, K {2, 3, 8, 9}, V {4, 5, 10, 11} (worked out by hand).
    name = "layers.0.attention.query_key_value.weight"
    by_heads = plan({name: (12, 3)}, heads={name: (2, 2)})[name]
    by_rule = plan({name: (12, 3)}, MuonConfig(rules=[Rule(match="*.query_key_value.*",
                                                            split=(4, 4, 4), groups=2)]))[name]
    x = np.arange(36.0).reshape(12, 3)
    for entry in (by_heads, by_rule):
        assert entry.blocks == (4, 4, 4) and entry.groups == 2
        m = to_matrices(x, entry)[0]
        for start, rows in zip(entry.block_offsets, ([0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11])):
            assert sorted(m[start:start + 4, 0] // 3) == rows
        np.testing.assert_array_equal(from_matrices(to_matrices(x, entry), entry), x)


def test_grouped_query_fused_matrix_is_never_cut_into_equal_thirds():
    # InternLM-style wqkv with 32 query and 8 key/value heads of 128: 4096 + 1024 + 1024 rows.
    entry = plan({"model.layers.0.attention.wqkv.weight": (6144, 4096)})[
        "model.layers.0.attention.wqkv.weight"]
    assert entry.blocks == (6144,) and entry.flags
    # Phi-3-style contiguous qkv_proj with the model's head counts: sizes follow.
    phi = plan({"l.qkv_proj.weight": (6144, 4096)}, heads={"l.qkv_proj.weight": (32, 8)})
    assert phi["l.qkv_proj.weight"].blocks == (4096, 1024, 1024)
    assert phi["l.qkv_proj.weight"].groups == 1


def test_in_proj_alone_is_not_attention():
    p = plan({"backbone.layers.0.mixer.in_proj.weight": (3072, 768),
              "backbone.layers.0.mixer.A_log": (1536, 16),
              "backbone.layers.0.mixer.conv1d.weight": (1536, 1, 4),
              "attn.in_proj_weight": (96, 32)})
    assert p["backbone.layers.0.mixer.in_proj.weight"].blocks == (3072,)
    assert not p["backbone.layers.0.mixer.A_log"].is_muon
    assert p["backbone.layers.0.mixer.conv1d.weight"].why.startswith("depthwise")
    assert p["attn.in_proj_weight"].blocks == (32, 32, 32)  # torch nn.MultiheadAttention


@pytest.mark.parametrize("name, shape", [
    ("transformer.lm_head.weight", (50257, 768)),
    ("model.decoder.output_projection.weight", (1000, 64)),
    ("score.weight", (2, 4096)),
    ("bert.classifier.weight", (3, 64)),
    ("vit.head.fc.weight", (10, 64)),
    ("output.weight", (1000, 64)),
])
def test_output_heads_by_name_anywhere_in_the_path(name, shape):
    entry = plan({name: shape})[name]
    assert (entry.algorithm, entry.decided_by) == ("adamw", "name")


@pytest.mark.parametrize("name", ["tok_emb.weight", "pos_emb.weight", "emb.weight",
                                  "model.decoder.embed_positions.weight", "wte.weight",
                                  "encoder.patch_embed.weight", "transformer.word_embeddings"])
def test_embeddings_by_name_anywhere_in_the_path(name):
    entry = plan({name: (100, 16)})[name]
    assert (entry.algorithm, entry.decided_by) == ("adamw", "name")


def test_hidden_output_and_vectors_in_matrix_form():
    p = plan({"bert.encoder.layer.0.output.dense.weight": (64, 256),
              "vit.cls_token": (1, 1, 64), "gain": (1, 64)})
    assert p["bert.encoder.layer.0.output.dense.weight"].is_muon
    assert not p["vit.cls_token"].is_muon and not p["gain"].is_muon


def test_shape_only_decisions_are_said_and_head_like_ones_flagged():
    p = plan({"Dense_3.kernel": (256, 50000), "blk.w": (64, 64)}, layout="in_out")
    assert p["blk.w"].decided_by == "shape" and "by shape alone" in p["blk.w"].why
    assert not p["blk.w"].flags
    assert "50000x256 matrix routed to Muon by shape alone" in p["Dense_3.kernel"].flags[0]
    assert "! Dense_3.kernel: 50000x256" in str(p)


def test_rule_groups_and_layout_are_validated():
    with pytest.raises(ValueError, match="rule.groups=3 is invalid: expected a divisor"):
        Rule(match="x", split=(4, 4, 4), groups=3)
    with pytest.raises(ValueError, match="rule.groups=2 is invalid"):
        Rule(match="x", groups=2)
    with pytest.raises(ValueError, match="rule.layout='io'"):
        Rule(match="x", layout="io")
