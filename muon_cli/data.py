"""Data that ships with the package: the UCI handwritten digits (see DIGITS_LICENSE.txt)."""

from __future__ import annotations

import gzip
from importlib import resources

import numpy as np

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
