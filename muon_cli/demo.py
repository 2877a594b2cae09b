"""`muon demo`: Muon against AdamW on a small character-level transformer, with the same data,
init and batches; the comparison is on held-out loss and accuracy, against training time."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import multiprocessing
import os
import platform
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np

from muon_cli.data import char_split, char_windows
from muon_core import MuonConfig, __version__

BACKENDS = ("torch", "jax")
ALGORITHMS = ("muon", "adamw")
CONTEXT = 64  # characters per sequence
EVAL_SEQUENCES = 64  # held-out sequences scored at every evaluation
# Chosen by `muon demo --sweep` (lowest best held-out loss over the default run); see
# docs/getting-started.md for the grid and the results.
TUNED_LR = {"muon": 0.05, "adamw": 3e-3}
SWEEP_LR = {"muon": (0.02, 0.05, 0.1), "adamw": (1e-3, 3e-3, 1e-2)}


@dataclasses.dataclass(frozen=True)
class Settings:
    """One demo run: batches, schedule and the learning rates of both optimizers."""

    backend: str = "torch"
    steps: int = 60
    batch_size: int = 32
    eval_every: int = 10
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


@dataclasses.dataclass(frozen=True)
class DemoData:
    """Every batch of a run (`x`, `y`: (steps, batch, CONTEXT)) and the fixed held-out set."""

    x: np.ndarray
    y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def demo_data(settings: Settings) -> DemoData:
    """Seeded training batches from the training text, and held-out sequences from the rest.

    Both optimizers get the same `DemoData`, so they see the same batches in the same order.
    """
    train_ids, test_ids = char_split()
    rng = np.random.default_rng(settings.seed + 1)
    x, y = char_windows(train_ids, CONTEXT, settings.steps * settings.batch_size, rng)
    shape = (settings.steps, settings.batch_size, CONTEXT)
    test_x, test_y = char_windows(test_ids, CONTEXT, EVAL_SEQUENCES,
                                  np.random.default_rng(settings.seed + 2))
    return DemoData(x.reshape(shape), y.reshape(shape), test_x, test_y)


def train_loop(step: Callable[[int], None], evaluate: Callable[[], dict[str, float]],
               settings: Settings, label: str, progress: bool | None) -> dict:
    """Run `step(i)` for every step, evaluating every `eval_every` steps; time the steps only.

    `evaluate()` returns the metrics (`test_loss`, `test_accuracy` on held-out text); the curve holds each metric as a list, with
    `step`, `seconds` (training time so far), `cpu_seconds` (the process's CPU time in the
    steps so far: steadier than `seconds` when other jobs share the cores) and the total
    `train_seconds`.
    """
    from tqdm.auto import tqdm

    curve = {"step": [0], "seconds": [0.0], "cpu_seconds": [0.0]} | {
        k: [v] for k, v in evaluate().items()}
    seconds = cpu_seconds = 0.0
    bar = tqdm(range(settings.steps), desc=f"{settings.backend} {label}", unit="step",
               leave=False, position=ALGORITHMS.index(label) if label in ALGORITHMS else 0,
               disable=not progress if progress is not None else None)
    for i in bar:
        start, cpu_start = time.perf_counter(), time.process_time()
        step(i)
        seconds += time.perf_counter() - start
        cpu_seconds += time.process_time() - cpu_start
        if (i + 1) % settings.eval_every == 0 or i + 1 == settings.steps:
            curve["step"].append(i + 1)
            curve["seconds"].append(seconds)
            curve["cpu_seconds"].append(cpu_seconds)
            for key, value in evaluate().items():
                curve[key].append(value)
            bar.set_postfix(test_loss=f"{curve['test_loss'][-1]:.4f}")
    return curve | {"train_seconds": seconds}


def run_torch(algorithm: str, settings: Settings, progress: bool | None = None,
              data: DemoData | None = None) -> dict:
    """Train the torch `CharGPT` with `algorithm` ("muon" or "adamw"); return its curve."""
    import torch
    from torch.nn import functional as F

    from muon_cli.data import VOCAB
    from muon_cli.torch_models import CharGPT

    data = data or demo_data(settings)
    torch.manual_seed(settings.seed)
    model = CharGPT(vocab=VOCAB, context=CONTEXT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per run: the timing does not depend on the machine's load
    if algorithm == "muon":
        from muon_torch import Muon

        opt = Muon.for_model(model, settings.muon_config())
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=settings.adamw_lr, betas=(0.9, 0.95),
                                weight_decay=settings.weight_decay)
    x, y, x_test, y_test = map(torch.from_numpy, (data.x, data.y, data.test_x, data.test_y))

    def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        loss_of(model(x[i]), y[i]).backward()
        opt.step()

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        logits = model(x_test)
        return {"test_loss": loss_of(logits, y_test).item(),
                "test_accuracy": (logits.argmax(-1) == y_test).float().mean().item()}

    try:
        return train_loop(step, evaluate, settings, algorithm, progress)
    finally:
        torch.set_num_threads(threads)


def run_jax(algorithm: str, settings: Settings, progress: bool | None = None,
            data: DemoData | None = None) -> dict:
    """Train the pure-JAX char model with `algorithm` ("muon" or "adamw"); return its curve."""
    import jax
    import optax

    from muon_cli.data import VOCAB
    from muon_cli.jax_models import char_gpt, init_char_gpt

    if algorithm == "muon":
        import muon_jax

        tx = muon_jax.muon(settings.muon_config())
    else:
        tx = optax.adamw(settings.adamw_lr, b1=0.9, b2=0.95, weight_decay=settings.weight_decay)
    data = data or demo_data(settings)
    x, y, x_test, y_test = map(jax.numpy.asarray, (data.x, data.y, data.test_x, data.test_y))
    state = {"params": init_char_gpt(jax.random.key(settings.seed), vocab=VOCAB,
                                     context=CONTEXT)}
    state["opt"] = tx.init(state["params"])

    def loss_fn(params, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(char_gpt(params, xb), yb).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # params and state updated in place
    def update(params, opt_state, xb, yb):
        grads = jax.grad(loss_fn)(params, xb, yb)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def metrics(params):
        logits = char_gpt(params, x_test)
        return {"test_loss": optax.softmax_cross_entropy_with_integer_labels(
                    logits, y_test).mean(),
                "test_accuracy": (logits.argmax(-1) == y_test).mean()}

    update = update.lower(state["params"], state["opt"], x[0], y[0]).compile()  # not timed

    def step(i: int) -> None:
        out = update(state["params"], state["opt"], x[i], y[i])
        state["params"], state["opt"] = jax.block_until_ready(out)

    def evaluate() -> dict[str, float]:
        return {k: float(v) for k, v in metrics(state["params"]).items()}

    return train_loop(step, evaluate, settings, algorithm, progress)


RUNNERS = {"torch": run_torch, "jax": run_jax}
ONE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def _one_thread_worker() -> None:
    """Pin a fresh worker process to one thread before torch or JAX starts in it."""
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {ONE_THREAD_XLA}".strip()
    os.environ["OMP_NUM_THREADS"] = "1"


def _run_one(backend: str, algorithm: str, settings: Settings, progress: bool | None,
             data: DemoData) -> dict:
    return RUNNERS[backend](algorithm, settings, progress, data)


def train_both(settings: Settings, progress: bool | None = None,
               data: DemoData | None = None) -> dict[str, dict]:
    """Both optimizers' curves. With two or more cores each trains in its own fresh process,
    side by side, one thread each: both see the same load at the same time, and the demo
    takes the time of one run. On one core they run one after the other."""
    import tqdm.auto  # noqa: F401  (a missing extra fails here, not inside a worker)

    data = data or demo_data(settings)
    if (os.cpu_count() or 1) < 2:
        return {name: _run_one(settings.backend, name, settings, progress, data)
                for name in ALGORITHMS}
    with concurrent.futures.ProcessPoolExecutor(
            len(ALGORITHMS), mp_context=multiprocessing.get_context("spawn"),
            initializer=_one_thread_worker) as pool:
        futures = {name: pool.submit(_run_one, settings.backend, name, settings, progress, data)
                   for name in ALGORITHMS}
        return {name: future.result() for name, future in futures.items()}


def first_reaching(curve: dict, target: float) -> int | None:
    """Index of the first evaluation whose held-out loss is at most `target` (None if never)."""
    return next((i for i, v in enumerate(curve["test_loss"]) if v <= target), None)


def summarize(curves: dict[str, dict]) -> dict[str, dict]:
    """Per optimizer: final and best held-out loss, final held-out accuracy, steps and training
    time to AdamW's best held-out loss, total training time."""
    target = min(curves["adamw"]["test_loss"])
    summary = {}
    for name, c in curves.items():
        hit = first_reaching(c, target)
        summary[name] = {"final_test_loss": c["test_loss"][-1],
                         "best_test_loss": min(c["test_loss"]),
                         "test_accuracy": c["test_accuracy"][-1],
                         "steps_to_adamw_best": None if hit is None else c["step"][hit],
                         "seconds_to_adamw_best": None if hit is None else c["seconds"][hit],
                         "cpu_seconds_to_adamw_best": (None if hit is None
                                                       else c["cpu_seconds"][hit]),
                         "train_seconds": c["train_seconds"]}
    return summary


def format_table(summary: dict[str, dict]) -> str:
    """The comparison as a fixed-width text table."""
    header = ("optimizer", "held-out loss", "best held-out loss", "held-out accuracy",
              "steps to AdamW best", "time to AdamW best", "CPU time to AdamW best", "time")
    rows = [header]
    for name, s in summary.items():
        reached = s["steps_to_adamw_best"] is not None
        rows.append((name, f"{s['final_test_loss']:.4f}", f"{s['best_test_loss']:.4f}",
                     f"{s['test_accuracy']:.1%}",
                     str(s["steps_to_adamw_best"]) if reached else "never",
                     f"{s['seconds_to_adamw_best']:.2f} s" if reached else "never",
                     f"{s['cpu_seconds_to_adamw_best']:.2f} s" if reached else "never",
                     f"{s['train_seconds']:.2f} s"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def speedup_line(summary: dict[str, dict]) -> str:
    """One sentence: how much sooner (steps and training time) Muon reaches AdamW's best
    held-out loss."""
    muon, adamw = summary["muon"], summary["adamw"]
    if muon["steps_to_adamw_best"] is None:
        return (f"Muon did not reach AdamW's best held-out loss (step "
                f"{adamw['steps_to_adamw_best']}) in this run.")
    return (f"Muon reached AdamW's best held-out loss ({adamw['best_test_loss']:.4f}) at step "
            f"{muon['steps_to_adamw_best']} after {muon['seconds_to_adamw_best']:.1f} s of "
            f"training ({muon['cpu_seconds_to_adamw_best']:.1f} s CPU), AdamW at step "
            f"{adamw['steps_to_adamw_best']} after {adamw['seconds_to_adamw_best']:.1f} s "
            f"({adamw['cpu_seconds_to_adamw_best']:.1f} s CPU): "
            f"{adamw['steps_to_adamw_best'] / muon['steps_to_adamw_best']:.1f}x fewer steps, "
            f"{adamw['seconds_to_adamw_best'] / muon['seconds_to_adamw_best']:.1f}x less time.")


def write_plot(curves: dict[str, dict], settings: Settings, path: Path) -> None:
    """Held-out loss and accuracy against training time for both optimizers, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=120)
    for name, curve in curves.items():
        lr = settings.muon_lr if name == "muon" else settings.adamw_lr
        loss_ax.plot(curve["seconds"], curve["test_loss"], label=f"{name} (lr {lr:g})")
        acc_ax.plot(curve["seconds"], curve["test_accuracy"], label=f"{name} (lr {lr:g})")
    loss_ax.axhline(min(curves["adamw"]["test_loss"]), color="grey", lw=0.8, ls="--",
                    label="AdamW's best")
    loss_ax.set(xlabel="training time (s)", ylabel="held-out cross-entropy")
    acc_ax.set(xlabel="training time (s)", ylabel="held-out next-character accuracy")
    for ax in (loss_ax, acc_ax):
        ax.legend()
    fig.suptitle(f"character-level transformer, {settings.backend} backend")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


TASK = (f"character-level GPT (2 blocks, width 128, context {CONTEXT}) on Python standard-"
        "library source; the last 10% of the text held out")


def record(settings: Settings, curves: dict[str, dict], summary: dict[str, dict]) -> dict:
    """Everything needed to read or redo the run, as JSON-ready values."""
    return {"muon_core": __version__, settings.backend: version(settings.backend),
            "python": platform.python_version(), "machine": platform.machine(),
            "task": TASK, "settings": dataclasses.asdict(settings),
            "muon_config": settings.muon_config().to_dict(), "summary": summary, "curves": curves}


def run_demo(settings: Settings, out: Path, progress: bool | None = None) -> dict:
    """Train with both optimizers, print the table, write `loss.png` and `demo.json` to `out`."""
    start = time.perf_counter()
    curves = train_both(settings, progress)
    summary = summarize(curves)
    out.mkdir(parents=True, exist_ok=True)
    write_plot(curves, settings, out / "loss.png")
    (out / "demo.json").write_text(json.dumps(record(settings, curves, summary), indent=2))
    print(format_table(summary))
    print(speedup_line(summary))
    print(f"wrote {out / 'loss.png'} and {out / 'demo.json'} "
          f"({time.perf_counter() - start:.0f} s in all)")
    return summary


def sweep(settings: Settings, progress: bool | None = None) -> dict[str, dict[float, float]]:
    """Best held-out loss for every learning rate in `SWEEP_LR`, per optimizer; prints a table.

    Muon's AdamW part (embeddings, head, norms, biases) keeps `settings.adamw_lr`.
    """
    runner, data = RUNNERS[settings.backend], demo_data(settings)
    results: dict[str, dict[float, float]] = {}
    for name, grid in SWEEP_LR.items():
        for lr in grid:
            key = "muon_lr" if name == "muon" else "adamw_lr"
            curve = runner(name, dataclasses.replace(settings, **{key: lr}), progress, data)
            results.setdefault(name, {})[lr] = min(curve["test_loss"])
            print(f"{name:6s} lr={lr:<8g} best held-out loss {min(curve['test_loss']):.4f}  "
                  f"final {curve['test_loss'][-1]:.4f}  "
                  f"held-out accuracy {curve['test_accuracy'][-1]:.1%}")
    return results
