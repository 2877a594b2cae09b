"""torch's generic optimizer checks, driven by torch's own `OptimizerInfo` machinery, against
`muon_torch.Muon`.

The sample configurations and error inputs are those of torch.optim.Muon's entry in
`torch.testing._internal.common_optimizers`; the properties follow the generic checks torch runs
on every optimizer in its database (`TestOptimRenewed`). Where `Muon` differs on purpose (see
docs/torch.md, "Differences from torch.optim"), the torch expectation is kept as a strict xfail
with the reason, and the test beside it checks what `Muon` does instead.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest")  # torch's internal test helpers import it
pytest.importorskip("muon_torch")

from muon_torch import Muon  # noqa: E402
from torch.nn import Parameter  # noqa: E402
from torch.optim.lr_scheduler import (CyclicLR, OneCycleLR, ReduceLROnPlateau,  # noqa: E402
                                      StepLR)
from torch.optim.optimizer import (register_optimizer_step_post_hook,  # noqa: E402
                                   register_optimizer_step_pre_hook)
from torch.testing._internal.common_optimizers import (  # noqa: E402
    OptimizerErrorEnum, OptimizerInfo, _get_optim_inputs_including_global_cliquey_kwargs,
    optim_error_inputs_func_muon, optim_inputs_func_muon)
from torch.testing._internal.common_utils import TestCase  # noqa: E402

from torch_helpers import one_thread  # noqa: E402,F401

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("one_thread")]

SCHEDULERS = [
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10)],
    [lambda opt: ReduceLROnPlateau(opt)],
    # Both cycle momentum by default: Muon's momentum and AdamW's beta1.
    [lambda opt: OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=20)],
    [lambda opt: CyclicLR(opt, base_lr=1e-4, max_lr=1e-2, step_size_up=5)],
]
MUON_INFO = OptimizerInfo(Muon, optim_inputs_func=optim_inputs_func_muon,
                          optim_error_inputs_func=optim_error_inputs_func_muon,
                          scheduler_inputs=SCHEDULERS, supported_impls=(),
                          not_og_supported_flags=(), supports_complex=False)
CHECK = TestCase()  # torch's assertEqual: nested state dicts, tensors and Python values alike


def _inputs():
    return _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, MUON_INFO)


CONFIGS = [pytest.param(i.desc, id=i.desc) for i in _inputs()]


def _kwargs(desc: str) -> dict:
    """A fresh copy of the sample configuration `desc` (a tensor lr must not carry over)."""
    return next(copy.deepcopy(i.kwargs) for i in _inputs() if i.desc == desc)


# -- error inputs ---------------------------------------------------------------------------------
# Deliberate differences, by error input: why Muon does not do what torch.optim.Muon does.
ERROR_DIFFERENCES = {
    "a param group cannot have duplicate parameters":
        "a tensor twice in one group is refused (ValueError, torch's words), not only warned about",
    "all optimizer param groups should be with/without names.":
        "groups without names get positional names, so named and unnamed groups mix",
    "only support 2D parameters":
        "tensors with more than two axes are routed to Muon as matrices (conv weights) or to AdamW",
    "only support `original` and `match_rms_adamw`":
        "torch's adjust_lr_fn is the config field lr_scaling, with more choices",
    "does not support complex parameters":
        "refused at construction (ValueError, torch's words) instead of at the first step",
}
ERROR_INPUTS = [
    pytest.param(e, id=e.optimizer_error_input.desc,
                 marks=[pytest.mark.xfail(strict=True, reason=ERROR_DIFFERENCES[
                     e.optimizer_error_input.desc])]
                 if e.optimizer_error_input.desc in ERROR_DIFFERENCES else [])
    for e in optim_error_inputs_func_muon("cpu", torch.float32)]


@pytest.mark.parametrize("error_input", ERROR_INPUTS)
def test_error_inputs_fail_as_torch_expects(error_input):
    spec = error_input.optimizer_error_input
    expect = (pytest.warns if issubclass(error_input.error_type, Warning) else pytest.raises)(
        error_input.error_type, match=error_input.error_regex)
    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        with expect:
            Muon(spec.params, **spec.kwargs)
    else:
        opt = Muon(spec.params, **spec.kwargs)
        with expect:
            opt.step()


def test_deliberate_error_differences_still_use_torchs_words():
    p = Parameter(torch.randn(2, 3))
    with pytest.raises(ValueError, match="a parameter group with duplicate parameters"):
        Muon([p, p])
    with pytest.raises(ValueError, match="Muon does not support complex parameters"):
        Muon([torch.randn(2, 3, dtype=torch.complex64)])
    with pytest.raises(ValueError, match="unknown key.*adjust_lr_fn.*lr_scaling"):
        Muon([p], adjust_lr_fn="arbitrary")


# -- training goes the right way, with schedulers -------------------------------------------------
def _weight_bias(contiguous: bool, dtype=torch.float32):
    torch.manual_seed(0)
    if contiguous:
        return Parameter(torch.randn(10, 5, dtype=dtype)), Parameter(torch.randn(10, dtype=dtype))
    return (Parameter(torch.randn(10, 5, 2, dtype=dtype)[..., 0]),
            Parameter(torch.randn(10, 2, dtype=dtype)[..., 0]))


def _loss_closure(opt, weight, bias, x):
    def closure():
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("contiguous,schedulers", [
    (True, None), (False, None), *((True, s) for s in SCHEDULERS)],
    ids=["contiguous", "noncontiguous", "StepLR", "ReduceLROnPlateau", "OneCycleLR", "CyclicLR"])
@pytest.mark.parametrize("desc", CONFIGS)
def test_sample_config_goes_right_direction(desc, contiguous, schedulers):
    weight, bias = _weight_bias(contiguous)
    x = torch.randn(5)
    opt = Muon([weight, bias], **_kwargs(desc))
    live = [make(opt) for make in schedulers or []]
    closure = _loss_closure(opt, weight, bias, x)
    initial = closure().item()
    for _ in range(20):
        loss = opt.step(closure)
        for scheduler in live:
            scheduler.step(loss) if isinstance(scheduler, ReduceLROnPlateau) else scheduler.step()
    assert closure().item() < initial


def test_momentum_cycling_schedulers_reach_both_halves():
    weight, bias = _weight_bias(True)
    opt = Muon([weight, bias], lr=0.01)
    scheduler = CyclicLR(opt, base_lr=1e-4, max_lr=1e-2, step_size_up=5,
                         base_momentum=0.5, max_momentum=0.9)
    closure = _loss_closure(opt, weight, bias, torch.randn(5))
    for _ in range(3):
        opt.step(closure)
        scheduler.step()
    muon_half, adamw_half = opt.param_groups
    assert 0.5 < muon_half["momentum"] < 0.9
    assert adamw_half["momentum"] == muon_half["momentum"]  # AdamW's beta1, as for torch's AdamW
    assert opt.defaults["lr"] == 0.01 and opt.defaults["momentum"] == 0.95


def test_adamw_half_uses_a_cycled_beta1():
    """The AdamW half reads beta1 from `momentum` once a scheduler writes it there: the same as
    putting that beta1 in `betas`."""
    results = []
    for cycled in (False, True):
        bias = Parameter(torch.linspace(-1, 1, 10))
        opt = Muon([bias], adamw={"betas": (0.5 if not cycled else 0.9, 0.95)})
        if cycled:
            opt.param_groups[1]["momentum"] = 0.5
        for _ in range(3):
            bias.grad = bias.detach().clone()
            opt.step()
        results.append(bias.detach())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("desc", CONFIGS)
def test_param_groups_weight_decay(desc):
    weight, bias = _weight_bias(True)
    x = torch.randn(5)
    opt = Muon([{"params": [weight], **_kwargs(desc)},
                {"params": [bias], **{**_kwargs(desc), "weight_decay": 0.0}}])
    closure = _loss_closure(opt, weight, bias, x)
    initial = closure().item()
    for _ in range(20):
        opt.step(closure)
    assert closure().item() < initial


def _param_groups_lr(desc: str, outer: dict):
    weight, bias = _weight_bias(True)
    irrelevant = Parameter(torch.randn(2))
    before = irrelevant.detach().clone()
    kwargs = _kwargs(desc)
    kwargs.setdefault("lr", 1e-3)
    opt = Muon([{"params": [weight, bias], **kwargs}, {"params": [irrelevant]}], **outer)
    closure = _loss_closure(opt, weight, bias, torch.randn(5))
    initial = closure().item()
    for _ in range(20):
        loss = closure()
        irrelevant.grad = torch.rand_like(irrelevant)
        opt.step()
    assert loss.item() < initial
    torch.testing.assert_close(irrelevant.detach(), before, rtol=0, atol=0)


@pytest.mark.xfail(strict=True, reason="`lr` is Muon's learning rate; the AdamW half (here the "
                   "1-D parameter) has its own, `adamw={'lr': ...}`")
@pytest.mark.parametrize("desc", CONFIGS[:1])
def test_param_groups_lr_torch_spelling(desc):
    _param_groups_lr(desc, {"lr": 1e-28})


@pytest.mark.parametrize("desc", CONFIGS)
def test_param_groups_lr(desc):
    _param_groups_lr(desc, {"lr": 1e-28, "adamw": {"lr": 1e-28}})


# -- tensor lr ------------------------------------------------------------------------------------
@pytest.mark.parametrize("desc", CONFIGS)
def test_tensor_lr_matches_float_lr(desc):
    weight, bias = _weight_bias(True)
    weight_c, bias_c = (p.detach().clone().requires_grad_() for p in (weight, bias))
    x = torch.randn(5)
    kwargs = {**_kwargs(desc), "lr": 1e-3, "adamw": {"lr": 1e-3}}
    opt = Muon([weight, bias], **kwargs)
    opt_t = Muon([weight_c, bias_c], **{**kwargs, "lr": torch.tensor(1e-3),
                                         "adamw": {"lr": torch.tensor(1e-3)}})
    for _ in range(5):
        opt.step(_loss_closure(opt, weight, bias, x))
        opt_t.step(_loss_closure(opt_t, weight_c, bias_c, x))
    CHECK.assertEqual(weight, weight_c)
    CHECK.assertEqual(bias, bias_c)


def test_tensor_lr_is_shared_and_scheduled_in_place():
    lr = torch.tensor(0.01)
    weight, bias = _weight_bias(True)
    opt = Muon([{"params": [weight]}, {"params": [bias], "lr": 0.02}], lr=lr)
    assert opt.param_groups[0]["lr"] is lr and opt.defaults["lr"] is lr
    assert opt.param_groups[2]["lr"] == 0.02  # a group's own lr wins
    StepLR(opt, step_size=1, gamma=0.5).step()
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.005)


def test_tensor_lr_with_more_than_one_element_is_refused_in_torchs_words():
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        Muon([Parameter(torch.randn(2, 3))], adamw={"lr": torch.tensor([1e-3, 1e-3])})


# -- steps that change nothing --------------------------------------------------------------------
@pytest.mark.parametrize("desc", CONFIGS)
def test_step_is_noop_when_params_have_no_grad(desc):
    params = [torch.randn(2, 3) for _ in range(2)]
    before = [p.clone() for p in params]
    opt = Muon(params, **_kwargs(desc))
    assert opt.step(lambda: torch.tensor([1.0])).item() == 1.0
    CHECK.assertEqual(params, before)


@pytest.mark.parametrize("desc", CONFIGS)
def test_step_is_noop_for_zero_grads(desc):
    param = torch.randn(5, 1, requires_grad=True)
    before = param.detach().clone()
    # torch's check runs only configurations without weight decay: both halves default to 0.1
    # (a (5, 1) tensor is a vector to the plan, so AdamW updates it).
    opt = Muon([param], **{**_kwargs(desc), "weight_decay": 0.0, "adamw": {"weight_decay": 0.0}})
    param.grad = torch.zeros_like(param)
    opt.step()
    CHECK.assertEqual(param, before)


def test_zero_grad_sets_none_by_default_or_zeros():
    weight, bias = _weight_bias(True)
    opt = Muon([weight, bias])
    _loss_closure(opt, weight, bias, torch.randn(5))()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in (weight, bias))
    opt.zero_grad()
    assert weight.grad is None and bias.grad is None


@pytest.mark.parametrize("desc", CONFIGS)
def test_optimizer_can_be_printed(desc):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    assert "Muon" in repr(Muon(params, **_kwargs(desc)))


def test_non_empty_state_after_a_step():
    model = torch.nn.Linear(5, 5)
    opt = Muon(model.parameters())
    model(torch.rand(2, 5)).sum().backward()
    opt.step()
    assert len(opt.state) == 2 and all(len(s) > 0 for s in opt.state.values())


# -- state dicts ----------------------------------------------------------------------------------
def _named(params, named: bool):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


def _without_names(state_dict):
    state_dict = copy.deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


@pytest.mark.parametrize("named_c", [True, False])
@pytest.mark.parametrize("named", [True, False])
@pytest.mark.parametrize("desc", CONFIGS)
def test_state_dict_deterministic(desc, named, named_c):
    weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
    x = torch.randn(3)
    opt = Muon(_named([weight, bias], named), **_kwargs(desc))
    for _ in range(10):
        opt.step(_loss_closure(opt, weight, bias, x))
    with torch.no_grad():
        weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
    opt_c = Muon(_named([weight_c, bias_c], named_c), **_kwargs(desc))
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(10):
        opt.step(_loss_closure(opt, weight, bias, x))
        opt_c.step(_loss_closure(opt_c, weight_c, bias_c, x))
        CHECK.assertEqual(weight, weight_c)
        CHECK.assertEqual(bias, bias_c)
    CHECK.assertEqual(_without_names(opt.state_dict()), _without_names(opt_c.state_dict()))
    opt_c.param_groups.extend(opt_c.param_groups)  # repeated groups: identical representation
    CHECK.assertEqual(_without_names(opt.state_dict())["param_groups"][-1],
                      _without_names(opt_c.state_dict())["param_groups"][-1])


def _conv_bn():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))
    return model, torch.rand(1, 4, 16, 16)


def _names_after_loading(desc: str, named: bool, named_2: bool) -> list[str]:
    model, x = _conv_bn()
    params = (lambda: model.named_parameters()) if named else (lambda: model.parameters())
    opt = Muon(params(), **_kwargs(desc))
    for _ in range(3):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    opt_2 = Muon(model.named_parameters() if named_2 else model.parameters(), **_kwargs(desc))
    opt_2.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt_2.zero_grad()
    model(x).sum().backward()
    opt_2.step()
    return [n for g in opt_2.state_dict()["param_groups"] for n in g["param_names"]]


@pytest.mark.parametrize("named,named_2", [(True, True), (False, True)])
@pytest.mark.parametrize("desc", CONFIGS)
def test_can_load_from_to_named_state_dict(desc, named, named_2):
    # torch reads group 0's names; the four tensors are spread over a Muon and an AdamW half here.
    assert sorted(_names_after_loading(desc, named, named_2)) == sorted(
        ["0.weight", "0.bias", "1.weight", "1.bias"])


@pytest.mark.xfail(strict=True, reason="an optimizer built without names names its parameters "
                   "by position and keeps those names when it loads a named state dict")
def test_unnamed_optimizer_takes_names_from_a_named_state_dict():
    assert sorted(_names_after_loading("default", True, False)) == sorted(
        ["0.weight", "0.bias", "1.weight", "1.bias"])


@pytest.mark.parametrize("named", [True, False])
@pytest.mark.parametrize("desc", CONFIGS)
def test_save_load_equality_with_weights_only(desc, named):
    weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
    opt = Muon(_named([weight, bias], named), **_kwargs(desc))
    for _ in range(3):
        opt.step(_loss_closure(opt, weight, bias, torch.randn(3)))
    saved = opt.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    CHECK.assertEqual(torch.load(buffer, weights_only=True), saved)


@pytest.mark.parametrize("desc", CONFIGS)
def test_load_nontensor_step(desc):
    """Older checkpoints hold AdamW's `step` as a Python number; the fused AdamW kernel needs
    the float32 tensor, which loading restores."""
    params = [Parameter(torch.randn(2, 3)), Parameter(torch.randn(3))]
    for p in params:
        p.grad = torch.rand_like(p)
    opt = Muon(params, **_kwargs(desc))
    for _ in range(3):
        opt.step()
    state_dict = copy.deepcopy(opt.state_dict())
    for p_state in state_dict["state"].values():
        if "step" in p_state:
            p_state["step"] = p_state["step"].item()
    opt.load_state_dict(state_dict)
    step = opt.state[params[1]]["step"]
    assert torch.is_tensor(step) and step.dtype == torch.float32 and step.item() == 3.0
    opt.step()
    assert opt.state[params[1]]["step"].item() == 4.0


# -- hooks ----------------------------------------------------------------------------------------
def _mark_state(opt):
    opt.state["test"] = 1


def _pop_mark(opt, state_dict):
    state_dict["ran_state_dict_pre_hook"] = state_dict["state"].pop("test", None) is not None
    return state_dict


def test_state_dict_hooks():
    opt = Muon([torch.rand(2, 3, requires_grad=True)])
    opt.register_state_dict_pre_hook(_mark_state)
    assert opt.state_dict()["state"]["test"] == 1
    opt.register_state_dict_post_hook(_pop_mark)
    state_dict = opt.state_dict()
    assert "test" not in state_dict["state"] and state_dict["ran_state_dict_pre_hook"]


def _set_lr(value, copy_first=False):
    def hook(opt, state_dict):
        if copy_first:
            state_dict = copy.deepcopy(state_dict)
        state_dict["param_groups"][0]["lr"] = value
        return state_dict if copy_first else None
    return hook


def test_load_state_dict_pre_hooks_run_in_order_and_prepend():
    opt = Muon([torch.rand(2, 3, requires_grad=True)])
    state_dict = opt.state_dict()
    opt.register_load_state_dict_pre_hook(_set_lr(0.002))
    opt.load_state_dict(state_dict)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(_set_lr(0.003, copy_first=True), prepend=True)
    opt.load_state_dict(state_dict)
    assert opt.param_groups[0]["lr"] == 0.002  # the prepended hook ran first


def test_load_state_dict_post_hook_sees_the_loaded_groups():
    opt = Muon([torch.rand(2, 3, requires_grad=True)])
    seen = []
    opt.register_load_state_dict_pre_hook(_set_lr(0.003, copy_first=True))
    opt.register_load_state_dict_post_hook(lambda o: seen.append(o.param_groups[0]["lr"]))
    opt.load_state_dict(opt.state_dict())
    assert seen == [0.003]


def test_step_hooks_run_in_order_and_can_be_removed():
    params = [torch.tensor([1.0, 1.0])]
    opt, sgd = Muon(params), torch.optim.SGD(params)
    calls = []
    handles = [register_optimizer_step_pre_hook(lambda *a: calls.append(0)),
               register_optimizer_step_post_hook(lambda *a: calls.append(5))]
    for o in (opt, sgd):
        handles += [o.register_step_pre_hook(lambda *a: calls.append(1)),
                    o.register_step_post_hook(lambda *a: calls.append(2))]
    opt.step()
    sgd.step()
    opt.step()
    assert calls == [0, 1, 2, 5] * 3
    for handle in handles:
        handle.remove()
    opt.step()
    assert calls == [0, 1, 2, 5] * 3


@pytest.mark.parametrize("desc", CONFIGS)
def test_deepcopy_copies_all_public_attrs(desc):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    opt = Muon(params, **_kwargs(desc))
    for _ in range(3):
        opt.step()
    public = lambda obj: {k for k in vars(obj) if not k.startswith("_")}  # noqa: E731
    clone = copy.deepcopy(opt)
    assert public(clone) == public(opt)
    assert clone.plan == opt.plan
    # torch's __setstate__ adds defaults["differentiable"] = False to the copy
    assert {k: v for k, v in clone.defaults.items() if k != "differentiable"} == opt.defaults


# -- dtypes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_param_dtypes_train_and_keep_their_dtype(dtype):
    weight, bias = _weight_bias(True, dtype)
    opt = Muon([weight, bias], lr=0.02, ns_dtype="float32")
    closure = _loss_closure(opt, weight, bias, torch.randn(5, dtype=dtype))
    initial = closure().item()
    for _ in range(10):
        opt.step(closure)
    assert closure().item() < initial
    assert weight.dtype == bias.dtype == dtype
    assert all(v.dtype == dtype for p in (weight, bias) for k, v in opt.state[p].items()
               if k != "step")


def _decayed_once(p, lr, wd):
    """Decay rounded once, from the exact float64 product."""
    return (p.double() * (1 - lr * wd)).to(p.dtype)


@pytest.mark.parametrize("lr", [0.02, torch.tensor(0.02)], ids=["float_lr", "tensor_lr"])
def test_bfloat16_weight_decay_rounds_the_product_once(lr):
    """With a zero gradient Muon's direction is zero, so a step is the decay alone."""
    param = Parameter(torch.randn(64, 32).to(torch.bfloat16))
    expected = _decayed_once(param.detach(), 0.02, 0.1)
    opt = Muon([param], lr=lr, weight_decay=0.1)
    param.grad = torch.zeros_like(param)
    opt.step()
    torch.testing.assert_close(param.detach(), expected, rtol=0, atol=0)


def test_bfloat16_sum_momentum_scales_by_beta_rounded_once():
    param = Parameter(torch.randn(64, 32).to(torch.bfloat16))
    opt = Muon([param], momentum_kind="sum", weight_decay=0.0, ns_dtype="float32")
    g1, g2 = (torch.randn(64, 32).to(torch.bfloat16) for _ in range(2))
    for grad in (g1, g2):
        param.grad = grad
        opt.step()
    expected = ((g1.double() * 0.95).to(torch.bfloat16).double() + g2.double()).to(torch.bfloat16)
    buf = opt.state[param]["momentum_buffer"]
    assert (buf != expected).float().mean() < 0.01  # beta rounded to bf16 first: most differ


# -- torch.compile --------------------------------------------------------------------------------
def test_compiled_step_with_tensor_lr_follows_a_scheduler():
    """A tensor lr changed in place by a scheduler: the compiled step follows it (eager
    backend, to keep the test fast)."""
    runs = []
    for compiled in (False, True):
        weight, bias = _weight_bias(True)
        opt = Muon([weight, bias], lr=torch.tensor(0.02), adamw={"lr": torch.tensor(0.01)},
                   ns_dtype="float32")
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        scheduler = StepLR(opt, step_size=1, gamma=0.5)
        closure = _loss_closure(opt, weight, bias, torch.arange(5.0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(3):
                closure()
                step()
                scheduler.step()
        runs.append((weight.detach(), bias.detach()))
    torch.testing.assert_close(runs[0], runs[1])



# -- bfloat16 parameters: master weights ----------------------------------------------------------
def test_master_weights_keep_decay_that_rounding_to_nearest_loses():
    """lr wd = 0.001: each step's decay is below half a bfloat16 ulp under 1.0, so rounding to
    nearest keeps 1.0 forever; a float32 master weight accumulates 0.999**10."""
    finals = {}
    for master in (False, True):
        param = Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
        opt = Muon([param], lr=0.02, weight_decay=0.05, master_weights=master)
        for _ in range(10):
            param.grad = torch.zeros_like(param)
            opt.step()
        finals[master] = param.detach()
    assert (finals[False] == 1).all()
    torch.testing.assert_close(finals[True], torch.full((4, 4), 0.999**10).to(torch.bfloat16),
                               rtol=0, atol=0)


def test_master_weights_follow_the_float32_trajectory():
    """Same start and gradients: the master weights are the float32 run's parameters, and the
    bfloat16 parameters are those rounded to nearest."""
    shapes = {"w": (16, 8), "b": (16,)}
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        params = [(n, Parameter(torch.randn(s).to(torch.bfloat16).to(dtype)))
                  for n, s in shapes.items()]
        opt = Muon(params, lr=0.05, master_weights=True, ns_dtype="float32")
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            for _, p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(torch.bfloat16).to(dtype)
            opt.step()
        runs[dtype] = (params, opt)
    (params32, _), (params16, opt16) = runs[torch.float32], runs[torch.bfloat16]
    for (_, p32), (_, p16) in zip(params32, params16):
        master = opt16.state[p16]["master_weight"]
        torch.testing.assert_close(master, p32.detach(), rtol=0, atol=0)
        torch.testing.assert_close(p16.detach(), p32.detach().to(torch.bfloat16), rtol=0, atol=0)


def test_master_weights_state_stays_float32_through_a_checkpoint():
    param = Parameter(torch.randn(8, 4).to(torch.bfloat16))
    opt = Muon([param], master_weights=True)
    param.grad = torch.randn_like(param)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = Muon([param], master_weights=True)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for key, value in opt.state[param].items():
        assert fresh.state[param][key].dtype == torch.float32
        torch.testing.assert_close(fresh.state[param][key], value, rtol=0, atol=0)


def test_master_weights_must_be_a_bool():
    with pytest.raises(ValueError, match="master_weights='yes' is invalid"):
        Muon([Parameter(torch.randn(2, 3))], master_weights="yes")
