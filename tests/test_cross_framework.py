"""One config, one trajectory: the same model trained 50 steps with muon_torch and muon_jax.

The model (embedding, two hidden matrices with biases, an output head) starts from the same
numpy weights in both frameworks and sees the same batches; both optimizers read the same
MuonConfig with float32 Newton-Schulz. The final weights must agree to float32 tolerance.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")
muon_torch = pytest.importorskip("muon_torch")

import muon_jax  # noqa: E402
from muon_core import MuonConfig  # noqa: E402

pytestmark = [pytest.mark.jax, pytest.mark.torch]

VOCAB, WIDTH, HIDDEN, CLASSES, BATCH, STEPS = 24, 16, 32, 6, 32, 50
# The standard iteration: the Gram form's float32 round-off differs between MKL and XLA by up to
# 3e-5 after 50 steps (measured), past this test's tolerance; the conformance suite checks the
# Gram form of each backend against the float64 reference.
CONFIG = MuonConfig(lr=0.02, weight_decay=0.01, ns_dtype="float32", ns_algorithm="standard",
                    adamw=dict(lr=3e-3, weight_decay=0.01))
# torch name -> (flax-style path, whether the torch tensor is a transposed Linear weight)
LAYERS = {
    "embed.weight": (("embed", "embedding"), False),
    "fc1.weight": (("fc1", "kernel"), True), "fc1.bias": (("fc1", "bias"), False),
    "fc2.weight": (("fc2", "kernel"), True), "fc2.bias": (("fc2", "bias"), False),
    "head.weight": (("head", "kernel"), True), "head.bias": (("head", "bias"), False),
}


def _initial_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {"embed.weight": (VOCAB, WIDTH), "fc1.weight": (HIDDEN, WIDTH),
              "fc1.bias": (HIDDEN,), "fc2.weight": (WIDTH, HIDDEN), "fc2.bias": (WIDTH,),
              "head.weight": (CLASSES, WIDTH), "head.bias": (CLASSES,)}
    return {n: (rng.normal(size=s) / np.sqrt(s[-1])).astype(np.float32)
            for n, s in shapes.items()}


def _batches() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [(rng.integers(0, VOCAB, BATCH), rng.integers(0, CLASSES, BATCH))
            for _ in range(STEPS)]


class TorchModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.fc1 = torch.nn.Linear(WIDTH, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, WIDTH)
        self.head = torch.nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens):
        x = self.embed(tokens)
        x = x + torch.tanh(self.fc2(torch.tanh(self.fc1(x))))
        return self.head(x)


def _train_torch(weights, batches) -> dict[str, np.ndarray]:
    model = TorchModel()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(weights[name]))
    opt = muon_torch.Muon(model.named_parameters(), config=CONFIG)
    for tokens, labels in batches:
        opt.zero_grad()
        logits = model(torch.from_numpy(tokens))
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
        opt.step()
    return {n: p.detach().numpy() for n, p in model.named_parameters()}


def _jax_forward(params, tokens):
    x = params["embed"]["embedding"][tokens]
    h = jnp.tanh(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    x = x + jnp.tanh(h @ params["fc2"]["kernel"] + params["fc2"]["bias"])
    return x @ params["head"]["kernel"] + params["head"]["bias"]


def _jax_loss(params, tokens, labels):
    logits = _jax_forward(params, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _train_jax(weights, batches) -> dict[str, np.ndarray]:
    params: dict = {}
    for name, ((module, leaf), transposed) in LAYERS.items():
        value = weights[name].T if transposed else weights[name]
        params.setdefault(module, {})[leaf] = jnp.asarray(value)
    tx = muon_jax.muon(CONFIG)

    @jax.jit
    def step(params, state, tokens, labels):
        grads = jax.grad(_jax_loss)(params, tokens, labels)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for tokens, labels in batches:
        params, state = step(params, state, tokens, labels)
    return {name: np.asarray(params[module][leaf]).T if transposed
            else np.asarray(params[module][leaf])
            for name, ((module, leaf), transposed) in LAYERS.items()}


def test_both_backends_route_alike():
    weights = _initial_weights()
    torch_plan = muon_torch.Muon(TorchModel().named_parameters(), config=CONFIG).plan
    flax_params: dict = {}
    for name, ((module, leaf), transposed) in LAYERS.items():
        flax_params.setdefault(module, {})[leaf] = weights[name].T if transposed else weights[name]
    jax_plan = muon_jax.plan_for(flax_params, CONFIG)
    for name, (path, _) in LAYERS.items():
        ours = jax_plan[".".join(path)]
        assert (ours.algorithm, ours.lr_scales) == (torch_plan[name].algorithm,
                                                    torch_plan[name].lr_scales), name
    assert [e.name for e in jax_plan.muon] == ["fc1.kernel", "fc2.kernel"]


def test_fifty_steps_end_at_the_same_weights():
    torch.manual_seed(0)
    weights, batches = _initial_weights(), _batches()
    from_torch = _train_torch(weights, batches)
    from_jax = _train_jax(weights, batches)
    for name, start in weights.items():
        moved = np.abs(from_torch[name] - start).max()
        assert moved > 1e-2, f"{name} barely moved ({moved=}): the comparison would be vacuous"
        np.testing.assert_allclose(from_jax[name], from_torch[name], atol=2e-5, rtol=1e-4,
                                   err_msg=name)
