"""Data that ships with the package: the UCI handwritten digits (see DIGITS_LICENSE.txt)."""

from __future__ import annotations

import argparse
import gzip
from importlib import resources

import numpy as np

from muon_core import MuonConfig

DIGITS_FILE = "digits.csv.gz"


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: pixels as float32 in [0, 1] with shape (1797, 64), labels as int64."""
    raw = resources.files("muon_cli").joinpath(DIGITS_FILE).read_bytes()
    table = np.loadtxt(gzip.decompress(raw).decode("ascii").splitlines(), delimiter=",",
                       dtype=np.int64)
    return (table[:, :-1] / 16.0).astype(np.float32), table[:, -1]


def digits_split(test_fraction: float = 0.2, seed: int = 0):
    """A seeded shuffle of the digits into `(x_train, y_train, x_test, y_test)`."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} is invalid: expected a number in (0, 1)")
    x, y = load_digits()
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = round(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


VOCAB = 96  # '\n' and the printable ASCII characters ' ' to '~'
CORPUS_MODULES = ("textwrap", "argparse", "dataclasses", "fractions", "statistics", "difflib")


def python_source_text(modules: tuple[str, ...] = CORPUS_MODULES) -> str:
    """Source code of some standard-library modules: a corpus every Python install has."""
    import importlib
    import inspect

    return "\n".join(inspect.getsource(importlib.import_module(name)) for name in modules)


def encode_chars(text: str) -> np.ndarray:
    """Characters as ids in [0, VOCAB): '\\n' is 0, ' '..'~' are 1..95, anything else is '?'."""
    codes = np.frombuffer(text.encode("ascii", "replace"), dtype=np.uint8).astype(np.int64)
    ids = codes - 31
    ids[codes == 10] = 0
    ids[(codes != 10) & ((codes < 32) | (codes > 126))] = ord("?") - 31
    return ids


def char_windows(ids: np.ndarray, context: int, batch_size: int, rng: np.random.Generator):
    """A random batch of `(inputs, targets)`, each `(batch_size, context)`; targets shift by one."""
    if len(ids) <= context:
        raise ValueError(f"context={context} is invalid: the text has only {len(ids)} characters")
    starts = rng.integers(0, len(ids) - context, size=batch_size)
    window = starts[:, None] + np.arange(context + 1)
    return ids[window[:, :-1]], ids[window[:, 1:]]


def char_split(test_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The encoded Python-source corpus as `(train_ids, test_ids)`: the last part is held out."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} is invalid: expected a number in (0, 1)")
    ids = encode_chars(python_source_text())
    cut = round(len(ids) * (1.0 - test_fraction))
    return ids[:cut], ids[cut:]


def char_example_settings(description: str, default_config: str) -> tuple[int, MuonConfig]:
    """Parse the char-model examples' `--steps` and `--config`; return the steps and the config."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--config", default=default_config)
    args = parser.parse_args()
    return args.steps, MuonConfig.from_file(args.config)
