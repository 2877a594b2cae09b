"""QK-clip in the core: config, routing, the rule checked against logits recomputed head by
head, and the logit helper."""

import math

import numpy as np
import pytest
from qk_clip_cases import all_cases, clip_and_check, random_heads, separate

import muon_core
from muon_core import MuonConfig, QKClipConfig, QKRule, max_logits, plan, qk_clip


def _numpy_clip(params, qk_max, config, layout):
    return qk_clip(params, qk_max, config, layout=layout)


@pytest.mark.parametrize("case", all_cases(), ids=lambda c: c.name)
def test_clipped_logits_reach_tau_per_head(case):
    before, after = clip_and_check(case, _numpy_clip)
    assert max(before) > max(after)


def test_inputs_are_not_modified():
    case = separate(4, 2)
    params = case.pack(random_heads(case, np.random.default_rng(1)))
    kept = {n: p.copy() for n, p in params.items()}
    qk_clip(params, {"attn": np.array([5.0, 0.1, 3.0, 0.2])}, case.config)
    for name in params:
        np.testing.assert_array_equal(params[name], kept[name])


def test_alpha_splits_the_scale_between_query_and_key():
    # tau / S = 0.25: alpha = 1 puts it all on the query, alpha = 0 all on the key.
    case = separate(2, 2)
    params = {n: np.ones_like(p) for n, p in case.pack(random_heads(case, np.random.default_rng(
        2))).items()}
    for alpha, q_scale, k_scale in ((1.0, 0.25, 1.0), (0.0, 1.0, 0.25), (0.5, 0.5, 0.5)):
        config = MuonConfig(qk_clip={"threshold": 1.0, "alpha": alpha})
        out = qk_clip(params, {"attn": np.array([4.0, 0.5])}, config)
        assert np.allclose(out["attn.q_proj.weight"][:4], q_scale)
        assert np.allclose(out["attn.k_proj.weight"][:4], k_scale)
        assert np.allclose(out["attn.q_proj.weight"][4:], 1.0)


def test_array_api_strict_gives_numpys_result():
    xp = pytest.importorskip("array_api_strict")
    case = separate(4, 2, bias=True)
    params = case.pack(random_heads(case, np.random.default_rng(3)))
    qk_max = {"attn": np.array([5.0, 0.1, 3.0, 0.2])}
    want = qk_clip(params, qk_max, case.config)
    got = qk_clip({n: xp.asarray(p) for n, p in params.items()},
                  {"attn": xp.asarray(qk_max["attn"])}, case.config)
    for name in want:
        np.testing.assert_allclose(np.from_dlpack(got[name]), want[name], rtol=1e-15)


def test_layer_prefix_picks_the_longest_match_and_skips_unreported_layers():
    shapes = {f"blocks.{i}.attn.{p}.weight": (8, 8) for i in (0, 1) for p in ("wq", "wk", "wv")}
    params = {n: np.ones(s) for n, s in shapes.items()}
    out = qk_clip(params, {"blocks.1.attn": np.array([4.0, 4.0])},
                  MuonConfig(qk_clip={"threshold": 1.0}))
    changed = sorted(n for n in params if not np.array_equal(out[n], params[n]))
    assert changed == ["blocks.1.attn.wk.weight", "blocks.1.attn.wq.weight"]


def test_fused_bias_follows_its_weights_blocks():
    params = {"attn.qkv.weight": np.ones((12, 4)), "attn.qkv.bias": np.ones(12)}
    out = qk_clip(params, {"attn": np.array([4.0])}, MuonConfig(qk_clip={"threshold": 1.0}))
    np.testing.assert_allclose(out["attn.qkv.bias"], [0.5] * 8 + [1.0] * 4)
    np.testing.assert_allclose(out["attn.qkv.weight"][:, 0], [0.5] * 8 + [1.0] * 4)


def test_config_round_trips_and_is_off_by_default():
    assert MuonConfig().qk_clip is None
    config = MuonConfig(qk_clip={"threshold": 50.0, "rules": [
        {"match": "*.q_b.*", "role": "query", "rope_dim": 64}]})
    assert config.qk_clip == QKClipConfig(50.0, 0.5, (QKRule("*.q_b.*", "query", 64),))
    for text, read in ((config.to_toml(), MuonConfig.from_toml),
                       (config.to_json(), MuonConfig.from_json)):
        assert read(text) == config
    assert MuonConfig.from_toml(MuonConfig().to_toml()) == MuonConfig()


@pytest.mark.parametrize("value, message", [
    ({"threshold": 0.0}, "qk_clip.threshold=0.0"),
    ({"alpha": 1.5}, "qk_clip.alpha=1.5"),
    ({"tau": 1.0}, "unknown QKClipConfig key"),
    ({"rules": [{"match": "*", "role": "value"}]}, "qk_clip.rules.role='value'"),
    ({"rules": [{"match": "*", "role": "query", "rope_dim": -1}]}, "qk_clip.rules.rope_dim=-1"),
    (3.0, "qk_clip=3.0"),
])
def test_bad_config_names_the_key(value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        MuonConfig(qk_clip=value)


def test_errors_name_the_problem():
    params = {"attn.q_proj.weight": np.ones((8, 4)), "attn.k_proj.weight": np.ones((8, 4))}
    on = MuonConfig(qk_clip={"threshold": 1.0})
    with pytest.raises(ValueError, match="QK-clip is off"):
        qk_clip(params, {"attn": np.ones(2)}, MuonConfig())
    with pytest.raises(ValueError, match=r"qk_max\['attn'\] holds NaN"):
        qk_clip(params, {"attn": np.array([1.0, np.nan])}, on)
    with pytest.raises(ValueError, match="'mlp' has no query parameter"):
        qk_clip(params, {"mlp": np.ones(2)}, on)
    with pytest.raises(ValueError, match="8 query rows cannot hold 3 heads"):
        qk_clip(params, {"attn": np.ones(3)}, on)
    with pytest.raises(ValueError, match="blocks=\\(12,\\)"):
        qk_clip({"attn.qkv.weight": np.ones((12, 4))}, {"attn": np.ones(1)},
                on.replace(split_qkv=False))


def test_routing_reads_the_plan_not_the_names_for_blocks():
    # A split rule of 8 + 4 + 4 rows makes K the middle 4 rows whatever the name says.
    config = MuonConfig(rules=({"match": "attn.qkv.*", "split": [8, 4, 4]},),
                        qk_clip={"threshold": 1.0})
    targets = muon_core._qk_clip.qk_targets(plan({"attn.qkv.weight": (16, 4)}, config),
                                            ["attn"], config.qk_clip)
    assert [(t.name, t.role, t.part("query"), t.part("key")) for t in targets] == [
        ("attn.qkv.weight", "qkv", (0, 8), (8, 4))]


def test_max_logits_matches_a_loop_with_gqa_mask_and_both_axes():
    rng = np.random.default_rng(4)
    q, k = rng.standard_normal((2, 6, 5, 4)), rng.standard_normal((2, 3, 5, 4))
    causal = np.tril(np.ones((5, 5), dtype=bool))
    want = [max((q[b, h] @ k[b, h // 2, :t + 1].T)[t].max() for b in range(2) for t in range(5))
            / math.sqrt(4) for h in range(6)]
    np.testing.assert_allclose(max_logits(q, k, mask=causal), want, rtol=1e-12)
    flax = max_logits(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), mask=causal,
                      heads_axis=-2)
    np.testing.assert_allclose(flax, want, rtol=1e-12)
    np.testing.assert_allclose(max_logits(q, k, scale=1.0), [
        max((q[b, h] @ k[b, h // 2].T).max() for b in range(2)) for h in range(6)], rtol=1e-12)
    with pytest.raises(ValueError, match="do not fit"):
        max_logits(q, k[:, :, :, :3])
