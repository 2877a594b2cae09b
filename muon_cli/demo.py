"""`muon demo`: Muon against AdamW on the digits MLP, with the same data, init and batches."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np

from muon_cli.data import digits_split
from muon_core import MuonConfig, __version__

BACKENDS = ("torch", "jax")
ALGORITHMS = ("muon", "adamw")
# Chosen by `muon demo --sweep` (lowest final training loss, seeds 0-2 over the default run); see
# docs/getting-started.md for the grid and the results.
TUNED_LR = {"muon": 0.01, "adamw": 3e-3}
SWEEP_LR = {"muon": (0.005, 0.01, 0.02, 0.05, 0.1),
            "adamw": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)}


@dataclasses.dataclass(frozen=True)
class Settings:
    """One demo run: data split, batches, schedule and the learning rates of both optimizers."""

    backend: str = "torch"
    steps: int = 300
    batch_size: int = 64
    eval_every: int = 5
    seed: int = 0
    muon_lr: float = TUNED_LR["muon"]
    adamw_lr: float = TUNED_LR["adamw"]
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is invalid: "
                             f"expected one of {list(BACKENDS)}")
        for key in ("steps", "batch_size", "eval_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}={value!r} is invalid: expected a positive int")

    def muon_config(self) -> MuonConfig:
        """The Muon config: hidden matrices at `muon_lr`, the rest by AdamW at `adamw_lr`."""
        return MuonConfig(lr=self.muon_lr, weight_decay=self.weight_decay,
                          adamw={"lr": self.adamw_lr, "weight_decay": self.weight_decay})


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """`(steps, batch_size)` sample indices: seeded epochs of shuffled data, shared by all runs."""
    rng = np.random.default_rng(seed + 1)
    epochs = -(-steps * batch_size // n)
    flat = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    return flat[: steps * batch_size].reshape(steps, batch_size)


def train_loop(step: Callable[[int], None], evaluate: Callable[[], dict[str, float]],
               settings: Settings, label: str, progress: bool | None) -> dict:
    """Run `step(i)` for every step, evaluating every `eval_every` steps; time the steps only.

    `evaluate()` returns the metrics (`loss` on the whole training set, `test_loss`,
    `test_accuracy`); the curve holds each metric as a list, with `step`, `seconds` (training
    time so far) and the total `train_seconds`.
    """
    from tqdm.auto import tqdm

    curve = {"step": [0], "seconds": [0.0]} | {k: [v] for k, v in evaluate().items()}
    seconds = 0.0
    bar = tqdm(range(settings.steps), desc=f"{settings.backend} {label}", unit="step",
               leave=False, disable=not progress if progress is not None else None)
    for i in bar:
        start = time.perf_counter()
        step(i)
        seconds += time.perf_counter() - start
        if (i + 1) % settings.eval_every == 0 or i + 1 == settings.steps:
            curve["step"].append(i + 1)
            curve["seconds"].append(seconds)
            for key, value in evaluate().items():
                curve[key].append(value)
            bar.set_postfix(loss=f"{curve['loss'][-1]:.4f}")
    return curve | {"train_seconds": seconds}


def run_torch(algorithm: str, settings: Settings, progress: bool | None = None) -> dict:
    """Train the torch digits MLP with `algorithm` ("muon" or "adamw"); return its curve."""
    import torch
    from torch.nn import functional as F

    from muon_cli.torch_models import DigitsMLP

    torch.manual_seed(settings.seed)
    model = DigitsMLP()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the matrices are small: more threads only add overhead
    if algorithm == "muon":
        from muon_torch import Muon

        opt = Muon.for_model(model, settings.muon_config())
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=settings.adamw_lr, betas=(0.9, 0.95),
                                weight_decay=settings.weight_decay)
    x, y, x_test, y_test = map(torch.from_numpy, digits_split(seed=settings.seed))
    batches = torch.from_numpy(batch_indices(len(y), settings.batch_size, settings.steps,
                                             settings.seed))

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[batches[i]]), y[batches[i]]).backward()
        opt.step()

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        logits = model(x_test)
        return {"loss": F.cross_entropy(model(x), y).item(),
                "test_loss": F.cross_entropy(logits, y_test).item(),
                "test_accuracy": (logits.argmax(1) == y_test).float().mean().item()}

    try:
        return train_loop(step, evaluate, settings, algorithm, progress)
    finally:
        torch.set_num_threads(threads)


def run_jax(algorithm: str, settings: Settings, progress: bool | None = None) -> dict:
    """Train the pure-JAX digits MLP with `algorithm` ("muon" or "adamw"); return its curve."""
    import jax
    import optax

    from muon_cli.jax_models import init_mlp, mlp

    if algorithm == "muon":
        import muon_jax

        tx = muon_jax.muon(settings.muon_config())
    else:
        tx = optax.adamw(settings.adamw_lr, b1=0.9, b2=0.95, weight_decay=settings.weight_decay)
    x, y, x_test, y_test = map(jax.numpy.asarray, digits_split(seed=settings.seed))
    batches = batch_indices(len(y), settings.batch_size, settings.steps, settings.seed)
    state = {"params": init_mlp(jax.random.key(settings.seed))}
    state["opt"] = tx.init(state["params"])

    def loss_fn(params, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(mlp(params, xb), yb).mean()

    @jax.jit
    def update(params, opt_state, xb, yb):
        grads = jax.grad(loss_fn)(params, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def metrics(params):
        logits = mlp(params, x_test)
        return {"loss": loss_fn(params, x, y), "test_loss": loss_fn(params, x_test, y_test),
                "test_accuracy": (logits.argmax(1) == y_test).mean()}

    jax.block_until_ready(update(state["params"], state["opt"], x[batches[0]], y[batches[0]]))

    def step(i: int) -> None:
        out = update(state["params"], state["opt"], x[batches[i]], y[batches[i]])
        state["params"], state["opt"] = jax.block_until_ready(out)

    def evaluate() -> dict[str, float]:
        return {k: float(v) for k, v in metrics(state["params"]).items()}

    return train_loop(step, evaluate, settings, algorithm, progress)


RUNNERS = {"torch": run_torch, "jax": run_jax}


def first_reaching(curve: dict, target: float) -> int | None:
    """Index of the first evaluation whose loss is at most `target` (None if never)."""
    return next((i for i, v in enumerate(curve["loss"]) if v <= target), None)


def summarize(curves: dict[str, dict]) -> dict[str, dict]:
    """Per optimizer: final and best training loss, held-out accuracy, steps to AdamW's best
    training loss, training time."""
    target = min(curves["adamw"]["loss"])
    summary = {}
    for name, c in curves.items():
        hit = first_reaching(c, target)
        summary[name] = {"final_loss": c["loss"][-1], "best_loss": min(c["loss"]),
                         "test_accuracy": c["test_accuracy"][-1],
                         "steps_to_adamw_best": None if hit is None else c["step"][hit],
                         "seconds_to_adamw_best": None if hit is None else c["seconds"][hit],
                         "train_seconds": c["train_seconds"]}
    return summary


def format_table(summary: dict[str, dict]) -> str:
    """The comparison as a fixed-width text table."""
    header = ("optimizer", "final loss", "best loss", "test accuracy", "steps to AdamW best",
              "time to AdamW best", "time")
    rows = [header]
    for name, s in summary.items():
        reached = s["steps_to_adamw_best"] is not None
        rows.append((name, f"{s['final_loss']:.4f}", f"{s['best_loss']:.4f}",
                     f"{s['test_accuracy']:.1%}",
                     str(s["steps_to_adamw_best"]) if reached else "never",
                     f"{s['seconds_to_adamw_best']:.2f} s" if reached else "never",
                     f"{s['train_seconds']:.2f} s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def speedup_line(summary: dict[str, dict]) -> str:
    """One sentence: how many times fewer steps Muon needs to reach AdamW's best loss."""
    muon, adamw = summary["muon"]["steps_to_adamw_best"], summary["adamw"]["steps_to_adamw_best"]
    if muon is None:
        return f"Muon did not reach AdamW's best training loss (step {adamw}) in this run."
    return (f"Muon reached AdamW's best training loss at step {muon}, AdamW at step {adamw}: "
            f"{adamw / muon:.1f}x fewer steps.")


def write_plot(curves: dict[str, dict], settings: Settings, path: Path) -> None:
    """Held-out loss against step for both optimizers, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, curve in curves.items():
        lr = settings.muon_lr if name == "muon" else settings.adamw_lr
        ax.plot(curve["step"], curve["loss"], label=f"{name} (lr {lr:g})")
    ax.axhline(min(curves["adamw"]["loss"]), color="grey", lw=0.8, ls="--",
               label="AdamW's best")
    ax.set(xlabel="step", ylabel="training cross-entropy", yscale="log",
           title=f"digits MLP, {settings.backend} backend")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def record(settings: Settings, curves: dict[str, dict], summary: dict[str, dict]) -> dict:
    """Everything needed to read or redo the run, as JSON-ready values."""
    return {"muon_core": __version__, settings.backend: version(settings.backend),
            "python": platform.python_version(),
            "machine": platform.machine(), "task": "UCI digits, MLP 64-256-256-10",
            "settings": dataclasses.asdict(settings),
            "muon_config": settings.muon_config().to_dict(), "summary": summary, "curves": curves}


def run_demo(settings: Settings, out: Path, progress: bool | None = None) -> dict:
    """Train with both optimizers, print the table, write `loss.png` and `demo.json` to `out`."""
    runner = RUNNERS[settings.backend]
    curves = {name: runner(name, settings, progress) for name in ALGORITHMS}
    summary = summarize(curves)
    out.mkdir(parents=True, exist_ok=True)
    write_plot(curves, settings, out / "loss.png")
    (out / "demo.json").write_text(json.dumps(record(settings, curves, summary), indent=2))
    print(format_table(summary))
    print(speedup_line(summary))
    print(f"wrote {out / 'loss.png'} and {out / 'demo.json'}")
    return summary


def sweep(settings: Settings, progress: bool | None = None) -> dict[str, dict[float, float]]:
    """Final training loss for every learning rate in `SWEEP_LR`, per optimizer; prints a table.

    Muon's AdamW part (biases, head) keeps `settings.adamw_lr`.
    """
    runner = RUNNERS[settings.backend]
    results: dict[str, dict[float, float]] = {}
    for name, grid in SWEEP_LR.items():
        for lr in grid:
            key = "muon_lr" if name == "muon" else "adamw_lr"
            curve = runner(name, dataclasses.replace(settings, **{key: lr}), progress)
            results.setdefault(name, {})[lr] = curve["loss"][-1]
            print(f"{name:6s} lr={lr:<8g} best loss {min(curve['loss']):.4f}  "
                  f"final {curve['loss'][-1]:.4f}  test accuracy {curve['test_accuracy'][-1]:.1%}")
    return results
