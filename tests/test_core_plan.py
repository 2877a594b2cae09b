"""The routing plan: defaults, layouts, rules, groups, splits, dimension numbers, errors."""

import math

import pytest

from muon_core import MuonConfig, Rule, lr_scale, plan

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
    assert p["lm_head.weight"].why == "head by name"
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
