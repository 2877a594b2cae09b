"""muon_torch.Muon as a torch.optim.Optimizer: inputs, groups, routing, state, errors."""

import copy
import io

import pytest

torch = pytest.importorskip("torch")

import muon_core  # noqa: E402
from muon_core import MuonConfig, Rule  # noqa: E402
from muon_torch import Muon, module_kinds  # noqa: E402
from muon_torch._newton_schulz import device_facts  # noqa: E402
from torch import nn  # noqa: E402
from torch_helpers import named_params, one_thread, set_grads  # noqa: E402, F401

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_thread")]

SHAPES = {"embed.weight": (10, 6), "h.attn.qkv.weight": (18, 6), "h.fc.weight": (12, 6),
          "h.fc.bias": (12,), "h.proj.weight": (6, 12), "conv.weight": (4, 3, 3, 3),
          "head.weight": (10, 6)}
MUON_NAMES = ["h.attn.qkv.weight", "h.fc.weight", "h.proj.weight", "conv.weight"]


def _snapshot(params, opt):
    return [p.detach().clone() for _, p in params], copy.deepcopy(opt.state_dict())


def _assert_same_snapshot(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1]["param_groups"] == b[1]["param_groups"]
    assert a[1]["state"].keys() == b[1]["state"].keys()
    for key, state in a[1]["state"].items():
        assert state.keys() == b[1]["state"][key].keys()
        for name, value in state.items():
            assert torch.equal(value, b[1]["state"][key][name])


def _tiny_gpt():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 32)
            self.proj = nn.Linear(32, 8)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(20, 8)
            self.conv = nn.Conv2d(3, 8, 3)
            self.block = Block()
            self.out = nn.Linear(8, 20, bias=False)
            self.out.weight = self.tok.weight  # tied

    return Tiny()


# -- inputs and groups ------------------------------------------------------------------------
def test_plain_tensors_are_named_by_position():
    tensors = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]
    opt = Muon(tensors)
    assert [e.name for e in opt.plan] == ["0", "1"]
    assert [g["algorithm"] for g in opt.param_groups] == ["muon", "adamw"]
    assert opt.param_groups[0]["params"][0] is tensors[0]
    assert opt.param_groups[1]["param_names"] == ["1"]


def test_named_parameters_route_by_plan_and_split_in_two_groups():
    params = named_params(SHAPES)
    opt = Muon(params, lr=0.05)
    assert opt.plan == muon_core.plan(SHAPES, MuonConfig(lr=0.05))
    assert opt.param_groups[0]["param_names"] == MUON_NAMES
    assert opt.param_groups[0]["lr"] == 0.05
    assert opt.param_groups[1]["lr"] == MuonConfig().adamw.lr
    assert opt.param_groups[1]["betas"] == MuonConfig().adamw.betas
    assert "head.weight" in opt.param_groups[1]["param_names"]
    assert "split 6+6+6" in str(opt.plan)


def test_group_dicts_with_overrides_names_and_algorithm():
    params = dict(named_params(SHAPES))
    config = MuonConfig(lr=0.02, adamw={"lr": 1e-3})
    opt = Muon([
        {"params": [params["h.fc.weight"], params["h.fc.bias"]], "names": ["fc.w", "fc.b"],
         "lr": 0.1, "nesterov": False, "adamw": {"lr": 5e-3}},
        {"params": [("embed.weight", params["embed.weight"])], "algorithm": "adamw",
         "lr": 1e-2, "betas": (0.8, 0.9)},
        {"params": [("h.proj.weight", params["h.proj.weight"])], "algorithm": "muon",
         "lr_scaling": "match_rms_adamw"},
    ], config)
    muon0, adamw0, muon1, adamw1, muon2, adamw2 = opt.param_groups
    assert (muon0["lr"], muon0["nesterov"], muon0["param_names"]) == (0.1, False, ["fc.w"])
    assert (adamw0["lr"], adamw0["param_names"]) == (5e-3, ["fc.b"])
    assert muon1["params"] == [] and adamw1["betas"] == (0.8, 0.9) and adamw1["lr"] == 1e-2
    assert opt.plan["embed.weight"].decided_by == "group"
    assert muon2["lr"] == 0.02 and adamw2["params"] == []
    assert opt.plan["h.proj.weight"].lr_scales == (0.2 * 12 ** 0.5,)


def test_add_param_group_later_extends_the_plan():
    params = named_params(SHAPES)
    opt = Muon(params[:3])
    opt.add_param_group({"params": params[3:], "lr": 0.3})
    assert [e.name for e in opt.plan] == list(SHAPES)
    assert len(opt.param_groups) == 4 and opt.param_groups[2]["lr"] == 0.3


def test_keyword_overrides_are_config_fields():
    opt = Muon(named_params(SHAPES), MuonConfig(lr=0.5), ns_dtype="float32", momentum=0.9)
    assert opt.config == MuonConfig(lr=0.5, ns_dtype="float32", momentum=0.9)
    assert opt.param_groups[0]["ns_dtype"] == "float32"
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['betas'\]"):
        Muon(named_params(SHAPES), betas=(0.9, 0.9))
    with pytest.raises(ValueError, match=r"lr=-1 is invalid"):
        Muon(named_params(SHAPES), lr=-1)


@pytest.mark.parametrize("group, message", [
    ({"foo": 1}, r"param group 0: unknown key\(s\) \['foo'\]"),
    ({"nonfinite": "skip"}, r"apply to the whole optimizer"),
    ({"algorithm": "sgd"}, r"algorithm='sgd' is invalid"),
    ({"algorithm": "adamw", "momentum": 0.9}, r"unknown key\(s\) \['momentum'\]"),
    ({"names": ["a"]}, r"names must be 2 strings"),
])
def test_bad_group_keys_are_refused(group, message):
    params = [nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=message):
        Muon([{"params": params, **group}])


def test_duplicate_tensors_and_names_are_refused():
    p = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="'1' with shape \\(3, 3\\) is already in this optimizer"):
        Muon([p, p])
    with pytest.raises(ValueError, match="name 'w' appears twice"):
        Muon([("w", p), ("w", nn.Parameter(torch.randn(2)))])


# -- refused parameters -------------------------------------------------------------------------
def test_vector_routed_to_muon_is_refused_with_name_and_shape():
    with pytest.raises(ValueError, match=r"'bias' with shape \(5,\) is routed to muon by group"):
        Muon([{"params": [("bias", nn.Parameter(torch.randn(5)))], "algorithm": "muon"}])


def test_complex_matrix_routed_to_muon_is_refused():
    p = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"'w' with shape \(4, 4\).*param.dtype=torch.complex64"):
        Muon([("w", p)])
    Muon([{"params": [("w", p)], "algorithm": "adamw"}])  # AdamW takes it


def test_sparse_gradient_is_refused_at_construction_and_at_step():
    p = nn.Parameter(torch.randn(4, 4))
    p.grad = torch.randn(4, 4).to_sparse()
    with pytest.raises(ValueError, match=r"'w' with shape \(4, 4\).*gradient is sparse"):
        Muon([("w", p)])
    opt = Muon([{"params": [("w", p)], "algorithm": "adamw"}])
    with pytest.raises(ValueError, match=r"'w' with shape \(4, 4\) has a sparse gradient"):
        opt.step()


def test_sparse_embedding_routed_to_muon_by_rule_is_refused():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"'0.weight' with shape \(10, 4\).*sparse=True"):
        Muon.for_model(model, rules=[Rule(match="0.*", algorithm="muon")])


# -- non-finite gradients -------------------------------------------------------------------------
@pytest.mark.parametrize("bad_name", ["h.fc.weight", "h.fc.bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_and_changes_nothing(bad_name, value):
    params = named_params(SHAPES)
    opt = Muon(params)
    set_grads(params, seed=1)
    opt.step()
    set_grads(params, seed=2)
    dict(params)[bad_name].grad.view(-1)[3] = value
    before = _snapshot(params, opt)
    shape = "x".join(map(str, SHAPES[bad_name]))
    with pytest.raises(FloatingPointError, match=rf"'{bad_name}' \({shape}\); nothing was updated"):
        opt.step()
    _assert_same_snapshot(before, _snapshot(params, opt))


def test_nonfinite_on_first_step_creates_no_state():
    params = named_params(SHAPES)
    opt = Muon(params)
    set_grads(params, seed=1)
    params[0][1].grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        opt.step()
    assert len(opt.state) == 0


def test_nonfinite_skip_policy_skips_the_whole_step():
    params = named_params(SHAPES)
    opt = Muon(params, nonfinite="skip")
    set_grads(params, seed=1)
    opt.step()
    set_grads(params, seed=2)
    params[1][1].grad[0, 0] = float("-inf")
    before = _snapshot(params, opt)
    opt.step()
    _assert_same_snapshot(before, _snapshot(params, opt))
    set_grads(params, seed=2)
    opt.step()
    assert not torch.equal(params[1][1].detach(), before[0][1])


def test_huge_finite_gradient_is_not_mistaken_for_inf():
    params = named_params({"w": (4, 4)})
    opt = Muon(params)
    params[0][1].grad = torch.full((4, 4), 3e38)  # its 2-norm overflows float32
    opt.step()
    assert params[0][1].isfinite().all()


# -- step semantics ----------------------------------------------------------------------------
def test_parameters_without_gradient_are_untouched():
    params = named_params(SHAPES)
    opt = Muon(params)
    set_grads(params, seed=1)
    params[1][1].grad = None
    params[3][1].grad = None
    before = params[1][1].detach().clone(), params[3][1].detach().clone()
    opt.step()
    assert torch.equal(params[1][1], before[0]) and torch.equal(params[3][1], before[1])
    assert params[1][1] not in opt.state and params[3][1] not in opt.state


def test_gradients_are_not_modified_and_closure_loss_is_returned():
    params = named_params(SHAPES, dtype=torch.bfloat16)
    opt = Muon(params, nesterov=False)
    set_grads(params, seed=1)
    grads = [p.grad.clone() for _, p in params]

    def closure():
        return torch.tensor(1.5)

    assert opt.step(closure).item() == 1.5
    for (_, p), g in zip(params, grads):
        assert torch.equal(p.grad, g)
    opt.zero_grad()
    assert all(p.grad is None for _, p in params)


def test_state_is_in_torch_format():
    params = named_params(SHAPES)
    opt = Muon(params)
    set_grads(params, seed=1)
    opt.step()
    state = opt.state_dict()["state"]
    names = [n for g in opt.state_dict()["param_groups"] for n in g["param_names"]]
    for index, name in enumerate(names):
        if name in MUON_NAMES:
            assert set(state[index]) == {"momentum_buffer"}
        else:
            assert set(state[index]) == {"step", "exp_avg", "exp_avg_sq"}
            assert state[index]["step"].item() == 1.0


def test_auto_ns_dtype_is_default_and_each_dtype_selectable():
    results = {}
    for ns_dtype in ("bfloat16", "float32", "auto"):
        params = named_params({"w": (16, 24)})
        opt = Muon(params, ns_dtype=ns_dtype, lr=0.1, weight_decay=0.0)
        set_grads(params, seed=3)
        opt.step()
        results[ns_dtype] = params[0][1].detach()
    assert Muon(named_params({"w": (3, 3)})).param_groups[0]["ns_dtype"] == "auto"
    diff = (results["bfloat16"] - results["float32"]).abs().max().item()
    assert 0 < diff < 0.1 * 0.1  # bf16 rounding of an update of size lr * O(1)
    # "auto" is exactly the dtype the core's rule picks for this CPU's reported facts
    chosen, _ = muon_core.auto_ns_dtype(device_facts(torch.device("cpu")))
    assert torch.equal(results["auto"], results[chosen])


def test_plan_footer_shows_the_ns_dtype_auto_picks():
    plan_text = str(Muon(named_params({"w": (3, 3)})).plan)
    chosen, reason = muon_core.auto_ns_dtype(device_facts(torch.device("cpu")))
    assert f"Newton-Schulz in {chosen} (ns_dtype='auto': {reason})" in plan_text
    assert str(Muon(named_params({"w": (3, 3)}), ns_dtype="float32", ns_algorithm="gram").plan
               ).endswith("; Newton-Schulz in float32")
    assert str(Muon(named_params({"w": (3, 3)}), ns_dtype="float32").plan).endswith(
        "; Newton-Schulz in float32, gram iteration (ns_algorithm='auto')")


# -- state_dict, schedulers, compile -----------------------------------------------------------
def test_state_dict_round_trip_resumes_bit_for_bit():
    config = MuonConfig(momentum_kind="sum", lr_scaling="match_rms_adamw")
    params_a = named_params(SHAPES)
    opt_a = Muon(params_a, config)
    for seed in range(3):
        set_grads(params_a, seed)
        opt_a.step()
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    params_b = [(n, nn.Parameter(p.detach().clone())) for n, p in params_a]
    opt_b = Muon(params_b, config)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    for seed in range(3, 6):
        set_grads(params_a, seed)
        set_grads(params_b, seed)
        opt_a.step()
        opt_b.step()
    for (_, a), (_, b) in zip(params_a, params_b):
        assert torch.equal(a, b)


def test_load_state_dict_refuses_foreign_or_misshapen_states():
    params = named_params({"w": (4, 6), "b": (4,)})
    set_grads(params, 0)
    adamw = torch.optim.AdamW([p for _, p in params])
    adamw.step()
    opt = Muon([{"params": params[1:], "algorithm": "adamw"}, {"params": params[:1]}])
    with pytest.raises(ValueError, match="group 1 holds adamw parameters but the state dict's "
                                         "group 1 has algorithm=None"):
        opt.load_state_dict({**adamw.state_dict(), "param_groups": [
            {"params": [], "algorithm": "muon"}] + adamw.state_dict()["param_groups"]})
    transposed = named_params({"w": (6, 4), "b": (4,)})
    saved = Muon(transposed)
    set_grads(transposed, 0)
    saved.step()
    with pytest.raises(ValueError, match=r"'momentum_buffer' of parameter 'w' has shape \(6, 4\), "
                                         r"expected the parameter's shape \(4, 6\)"):
        Muon(params).load_state_dict(saved.state_dict())


def test_lr_scheduler_scales_both_halves():
    params_a, params_b = named_params(SHAPES), named_params(SHAPES)
    opt_a = Muon(params_a, lr=0.04, adamw={"lr": 2e-3})
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda step: 0.5)
    opt_b = Muon(params_b, lr=0.02, adamw={"lr": 1e-3})
    assert [g["lr"] for g in opt_a.param_groups] == [0.02, 1e-3]
    set_grads(params_a, 1)
    set_grads(params_b, 1)
    opt_a.step()
    opt_b.step()
    scheduler.step()
    for (_, a), (_, b) in zip(params_a, params_b):
        assert torch.equal(a, b)


def test_deepcopy_keeps_routing():
    params = named_params(SHAPES)
    opt = Muon(params)
    clone = copy.deepcopy(opt)
    assert clone.plan == opt.plan and clone.config == opt.config


def _eager_and_compiled_params(compile_step, **overrides):
    """Two identical parameter sets after two steps: one eager, one through `compile_step`."""
    eager_params, compiled_params = named_params(SHAPES), named_params(SHAPES)
    eager, compiled = Muon(eager_params, **overrides), Muon(compiled_params, **overrides)
    step = compile_step(compiled.step)
    for seed in range(2):
        set_grads(eager_params, seed)
        set_grads(compiled_params, seed)
        eager.step()
        step()
    return eager_params, compiled_params


def test_compiled_step_matches_eager():
    eager, compiled = _eager_and_compiled_params(lambda f: torch.compile(f, backend="eager"))
    for (_, a), (_, b) in zip(eager, compiled):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_inductor_compiled_step_matches_eager():
    # float32 NS: inductor fuses elementwise work, which may flip a bfloat16 rounding
    eager, compiled = _eager_and_compiled_params(torch.compile, ns_dtype="float32")
    for (_, a), (_, b) in zip(eager, compiled):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# -- for_model ---------------------------------------------------------------------------------
def test_module_kinds_reads_embeddings_tied_head_norms_and_hidden():
    kinds = module_kinds(_tiny_gpt())
    assert kinds["tok.weight"] == "embedding"  # also the tied output projection
    assert "out.weight" not in kinds  # named_parameters lists a tied tensor once
    assert kinds["block.ln.weight"] == "norm" and kinds["conv.weight"] == "hidden"
    assert kinds["block.attn.out_proj.weight"] == "hidden"
    assert kinds["block.fc.weight"] == "hidden"
    assert kinds["block.proj.weight"] == "hidden"
    assert module_kinds(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))["1.weight"] == "head"


def test_for_model_routes_conv_qkv_and_hidden_to_muon():
    opt = Muon.for_model(_tiny_gpt())
    plan = opt.plan
    assert [e.name for e in plan.muon] == ["conv.weight", "block.attn.in_proj_weight",
                                           "block.attn.out_proj.weight", "block.fc.weight",
                                           "block.proj.weight"]
    assert plan["conv.weight"].matrix_shape == (1, 8, 27)
    assert plan["block.attn.in_proj_weight"].blocks == (8, 8, 8)
    assert (plan["tok.weight"].algorithm, plan["tok.weight"].why) == ("adamw", "embedding module")


def test_for_model_trains_and_head_is_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 1))
    assert Muon.for_model(model).plan["4.weight"].why == "head module"
    opt = Muon.for_model(model, lr=0.02, adamw={"lr": 1e-2, "weight_decay": 0.0})
    x = torch.randn(64, 8)
    y = x[:, :1] * x[:, 1:2]
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_ns_dtype_set_on_a_group_is_refused_before_anything_changes():
    params = named_params(SHAPES)
    opt = Muon(params)
    set_grads(params, seed=1)
    opt.param_groups[0]["ns_dtype"] = "int8"
    before = _snapshot(params, opt)
    with pytest.raises(ValueError, match=r"ns_dtype='int8' is invalid: expected one of"):
        opt.step()
    _assert_same_snapshot(before, _snapshot(params, opt))
