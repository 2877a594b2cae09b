"""The portable checkpoint: torch -> JAX and JAX -> torch mid-training, refusals, the format.

The model and batches are those of test_cross_framework (the same weights in torch's (out, in)
and flax's (in, out) layouts). Resuming in the other framework after 20 steps must end where
40 uninterrupted steps end, to float32 tolerance, for plain Muon and for the NorMuon and
AdaMuon second moments.
"""

import json
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
muon_torch = pytest.importorskip("muon_torch")

import jax.numpy as jnp  # noqa: E402
import muon_jax  # noqa: E402
from muon_core import MuonConfig, read_checkpoint  # noqa: E402
from muon_core import _checkpoint  # noqa: E402
from test_cross_framework import (  # noqa: E402
    CONFIG, LAYERS, TorchModel, _initial_weights, _jax_loss,
)

pytestmark = [pytest.mark.jax, pytest.mark.torch]

STEPS = 40
SECOND_MOMENTS = pytest.mark.parametrize("second_moment", ["none", "normuon", "adamuon"])
# flax leaf name -> torch parameter name
TO_TORCH = {".".join(path): name for name, (path, _) in LAYERS.items()}


def _batches():
    rng = np.random.default_rng(1)
    return [(rng.integers(0, 24, 32), rng.integers(0, 6, 32)) for _ in range(STEPS)]


class TorchRun:
    """A torch model and its Muon, from numpy weights (torch layout)."""

    def __init__(self, weights, config=CONFIG):
        self.model = TorchModel()
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.copy_(torch.from_numpy(np.array(weights[name])))
        self.opt = muon_torch.Muon(self.model.named_parameters(), config=config)

    def train(self, batches):
        for tokens, labels in batches:
            self.opt.zero_grad()
            logits = self.model(torch.from_numpy(tokens))
            torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
            self.opt.step()
        return self

    def weights(self):
        return {n: p.detach().numpy().copy() for n, p in self.model.named_parameters()}


class JaxRun:
    """The same model as a flax-layout pytree and `muon_jax.muon`."""

    def __init__(self, weights, config=CONFIG):
        self.params = {}
        for name, ((module, leaf), transposed) in LAYERS.items():
            value = weights[name].T if transposed else weights[name]
            self.params.setdefault(module, {})[leaf] = jnp.asarray(value)
        self.config = config
        self.tx = muon_jax.muon(config)
        self.state = self.tx.init(self.params)

    def train(self, batches):
        @jax.jit
        def step(params, state, tokens, labels):
            grads = jax.grad(_jax_loss)(params, tokens, labels)
            updates, state = self.tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        for tokens, labels in batches:
            self.params, self.state = step(self.params, self.state, tokens, labels)
        return self

    def weights(self):
        return {name: np.asarray(self.params[m][leaf]).T if transposed
                else np.asarray(self.params[m][leaf])
                for name, ((m, leaf), transposed) in LAYERS.items()}


def _assert_same(resumed, uninterrupted, start):
    for name in start:
        moved = np.abs(uninterrupted[name] - start[name]).max()
        assert moved > 1e-2, f"{name} barely moved ({moved=}): the comparison would be vacuous"
        np.testing.assert_allclose(resumed[name], uninterrupted[name], atol=2e-5, rtol=1e-4,
                                   err_msg=name)


def _second_moment_of(jax_state, leaf):
    return np.asarray(jax_state.second_moment[leaf])


@SECOND_MOMENTS
def test_torch_to_jax_resumes_where_torch_would_be(tmp_path, second_moment):
    torch.manual_seed(0)
    config = CONFIG.replace(second_moment=second_moment)
    start, batches = _initial_weights(), _batches()
    uninterrupted = TorchRun(start, config).train(batches).weights()
    first = TorchRun(start, config).train(batches[:20])
    muon_torch.save(tmp_path / "opt.safetensors", first.opt)
    second = JaxRun(first.weights(), config)
    second.state = muon_jax.load(tmp_path / "opt.safetensors", second.state, second.params,
                                 config, names=TO_TORCH)
    assert int(second.state.count) == 20
    if second_moment != "none":  # loaded as torch holds it, in flax's layout
        v = first.opt.state[first.model.fc1.weight]["second_moment"].numpy()
        got = _second_moment_of(second.state, "fc1.kernel")
        np.testing.assert_array_equal(got, v if second_moment == "normuon" else v.T)
        assert np.abs(v).max() > 0
    _assert_same(second.train(batches[20:]).weights(), uninterrupted, start)


@SECOND_MOMENTS
def test_jax_to_torch_resumes_where_jax_would_be(tmp_path, second_moment):
    torch.manual_seed(0)
    config = CONFIG.replace(second_moment=second_moment)
    start, batches = _initial_weights(), _batches()
    uninterrupted = JaxRun(start, config).train(batches).weights()
    first = JaxRun(start, config).train(batches[:20])
    muon_jax.save(tmp_path / "opt.safetensors", first.state, first.params, config,
                  names=TO_TORCH)
    second = TorchRun(first.weights(), config)
    muon_torch.load(tmp_path / "opt.safetensors", second.opt)
    _assert_same(second.train(batches[20:]).weights(), uninterrupted, start)


def test_same_framework_round_trip_is_exact(tmp_path):
    run = TorchRun(_initial_weights()).train(_batches()[:3])
    muon_torch.save(tmp_path / "a.safetensors", run.opt)
    fresh = TorchRun(run.weights())
    muon_torch.load(tmp_path / "a.safetensors", fresh.opt)
    for a, b in zip(run.model.parameters(), fresh.model.parameters()):
        p, q = run.opt.state[a], fresh.opt.state[b]
        assert p.keys() == q.keys()
        for key in p:
            assert torch.equal(p[key], q[key]), key


def test_file_is_plain_safetensors(tmp_path):
    """Read back with nothing but struct and json, as any safetensors reader would."""
    run = TorchRun(_initial_weights()).train(_batches()[:2])
    path = tmp_path / "a.safetensors"
    muon_torch.save(path, run.opt)
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    meta = header.pop("__metadata__")
    assert meta["format"] == "muon-checkpoint" and meta["version"] == "1"
    assert MuonConfig.from_dict(json.loads(meta["config"])) == CONFIG
    info = header["fc1.weight/momentum_buffer"]
    assert info["dtype"] == "F32" and info["shape"] == [32, 16]
    start, end = info["data_offsets"]
    stored = np.frombuffer(data[8 + size + start:8 + size + end], np.float32).reshape(32, 16)
    expected = run.opt.state[run.model.fc1.weight]["momentum_buffer"].numpy()
    np.testing.assert_array_equal(stored, expected)
    assert json.loads(meta["steps"])["fc1.bias"] == 2


def test_safetensors_package_reads_it_if_installed(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    run = TorchRun(_initial_weights()).train(_batches()[:2])
    muon_torch.save(tmp_path / "a.safetensors", run.opt)
    tensors = safetensors_numpy.load_file(str(tmp_path / "a.safetensors"))
    np.testing.assert_array_equal(tensors["head.bias/exp_avg"],
                                  run.opt.state[run.model.head.bias]["exp_avg"].numpy())


@pytest.mark.parametrize("change, message", [
    ("shape", "parameter 'fc1.weight': stored_shape is [32, 16] in the checkpoint, [33, 16] here"),
    ("name", "parameter 'fc9.weight' is not in the checkpoint"),
    ("routing", "parameter 'fc1.weight': algorithm is muon in the checkpoint, adamw here"),
])
def test_another_model_or_routing_is_refused_naming_the_difference(tmp_path, change, message):
    run = TorchRun(_initial_weights()).train(_batches()[:1])
    path = tmp_path / "a.safetensors"
    muon_torch.save(path, run.opt)
    if change == "shape":
        wider = torch.nn.Parameter(torch.zeros(33, 16))
        other = muon_torch.Muon([(n, wider if n == "fc1.weight" else p) for n, p in
                                 TorchModel().named_parameters()], config=CONFIG)
    elif change == "name":
        other = muon_torch.Muon([(n.replace("fc1", "fc9"), p) for n, p in
                                 TorchModel().named_parameters()], config=CONFIG)
    else:
        rule = {"match": "fc1.weight", "algorithm": "adamw"}
        other = muon_torch.Muon(TorchModel().named_parameters(),
                                config=CONFIG.replace(rules=[rule]))
    before = dict(other.state)
    with pytest.raises(ValueError) as err:
        muon_torch.load(path, other)
    assert message in str(err.value)
    assert dict(other.state) == before


@pytest.mark.parametrize("saved, here", [("normuon", "none"), ("none", "adamuon"),
                                         ("adamuon", "normuon")])
def test_another_second_moment_is_refused_by_both_backends(tmp_path, saved, here):
    path = tmp_path / "a.safetensors"
    run = TorchRun(_initial_weights(), CONFIG.replace(second_moment=saved))
    muon_torch.save(path, run.train(_batches()[:1]).opt)
    message = f"parameter 'fc1.weight': second_moment is {saved} in the checkpoint, {here} here"
    other = TorchRun(_initial_weights(), CONFIG.replace(second_moment=here)).train(_batches()[:1])
    before = {p: {k: v.clone() for k, v in s.items()} for p, s in other.opt.state.items()}
    with pytest.raises(ValueError, match=message):
        muon_torch.load(path, other.opt)
    for param, state in before.items():
        assert all(torch.equal(v, other.opt.state[param][k]) for k, v in state.items())
    jax_run = JaxRun(_initial_weights(), CONFIG.replace(second_moment=here))
    with pytest.raises(ValueError, match=message):
        muon_jax.load(path, jax_run.state, jax_run.params, jax_run.config, names=TO_TORCH)


def test_another_format_version_is_refused(tmp_path):
    run = TorchRun(_initial_weights()).train(_batches()[:1])
    path = tmp_path / "a.safetensors"
    muon_torch.save(path, run.opt)
    metadata, tensors = _checkpoint.read_safetensors(path)
    _checkpoint.write_safetensors(path, tensors, {**metadata, "version": "2"})
    with pytest.raises(ValueError, match="format version '2': expected 1"):
        muon_torch.load(path, run.opt)
    with pytest.raises(ValueError, match="format version '2': expected 1"):
        read_checkpoint(path)


def test_a_state_tensor_of_another_shape_is_refused_by_both_backends(tmp_path):
    run = TorchRun(_initial_weights()).train(_batches()[:1])
    path = tmp_path / "a.safetensors"
    muon_torch.save(path, run.opt)
    metadata, tensors = _checkpoint.read_safetensors(path)
    bias = next(n for n in tensors if n.endswith("bias/exp_avg"))
    stored = tensors[bias]  # an AdamW moment with an extra leading axis of 1
    tensors[bias] = _checkpoint.Tensor(stored.dtype, (1, *stored.shape), stored.data)
    _checkpoint.write_safetensors(path, tensors, metadata)
    message = f"state 'exp_avg' of parameter '{bias.split('/')[0]}' has shape"
    before = {p: {k: v.clone() for k, v in s.items()} for p, s in run.opt.state.items()}
    with pytest.raises(ValueError, match=message):
        muon_torch.load(path, run.opt)
    for param, state in before.items():
        assert all(torch.equal(v, run.opt.state[param][k]) for k, v in state.items())
    jax_run = JaxRun(_initial_weights())
    with pytest.raises(ValueError, match=message):
        muon_jax.load(path, jax_run.state, jax_run.params, CONFIG, names=TO_TORCH)


def test_jax_refuses_a_checkpoint_of_another_model(tmp_path):
    run = TorchRun(_initial_weights()).train(_batches()[:1])
    muon_torch.save(tmp_path / "a.safetensors", run.opt)
    jax_run = JaxRun(_initial_weights())
    with pytest.raises(ValueError, match="parameter 'embed.embedding' is not in the checkpoint"):
        muon_jax.load(tmp_path / "a.safetensors", jax_run.state, jax_run.params, CONFIG)


def test_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ValueError, match="header length 1000 runs past the end"):
        read_checkpoint(path)


def test_summary_lists_config_plan_steps_and_sizes(tmp_path):
    run = TorchRun(_initial_weights()).train(_batches()[:3])
    muon_torch.save(tmp_path / "a.safetensors", run.opt)
    text = _checkpoint.summary(read_checkpoint(tmp_path / "a.safetensors"))
    assert "lr = 0.02" in text and "7 parameters, 2 muon, 5 adamw" in text
    line = next(row for row in text.splitlines() if row.startswith("fc1.weight"))
    assert "muon" in line and "1x32x16" in line and str(32 * 16 * 4) in line
    line = next(row for row in text.splitlines() if row.startswith("fc1.bias"))
    assert line.split()[4] == "3"


def test_cli_inspect_prints_the_summary(tmp_path, capsys):
    from muon_cli.main import main

    run = TorchRun(_initial_weights()).train(_batches()[:1])
    muon_torch.save(tmp_path / "a.safetensors", run.opt)
    assert main(["checkpoint", "inspect", str(tmp_path / "a.safetensors")]) == 0
    out = capsys.readouterr().out
    assert out.strip() == _checkpoint.summary(read_checkpoint(tmp_path / "a.safetensors"))
    (tmp_path / "bad").write_bytes(b"x")
    assert main(["checkpoint", "inspect", str(tmp_path / "bad")]) == 1
    assert "too short for a safetensors file" in capsys.readouterr().err
