"""The examples run end to end, and the shared text helpers they use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from muon_cli.data import VOCAB, char_windows, encode_chars
from muon_core import MuonConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_encode_chars_maps_ascii_and_replaces_the_rest():
    assert encode_chars("\n a~").tolist() == [0, 1, 66, 95]
    assert encode_chars("é\t").tolist() == [ord("?") - 31] * 2
    assert VOCAB == 96


def test_char_windows_targets_are_shifted_inputs():
    ids = np.arange(100)
    x, y = char_windows(ids, 8, 4, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 8)
    assert np.array_equal(y[:, :-1], x[:, 1:]) and np.array_equal(y[:, 0], x[:, 0] + 1)
    with pytest.raises(ValueError, match="context=100"):
        char_windows(ids, 100, 1, np.random.default_rng(0))


def test_shared_config_file_reads():
    cfg = MuonConfig.from_file(EXAMPLES / "muon.toml")
    assert cfg.lr == 0.02 and cfg.adamw.lr == 3e-3 and cfg.lr_scaling == "original"


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.torch
def test_char_gpt_torch_example():
    pytest.importorskip("muon_torch")
    out = _run("char_gpt_torch.py", "--steps", "2")
    assert "h.0.attn.qkv.weight" in out and "step     1  loss" in out


@pytest.mark.jax
@pytest.mark.slow  # the same model and transform as the README's JAX example, tested by default
def test_char_gpt_jax_example():
    pytest.importorskip("muon_jax")
    out = _run("char_gpt_jax.py", "--steps", "2")
    assert "h.0.attn.qkv.kernel" in out and "step     1  loss" in out


@pytest.mark.torch
def test_cnn_example():
    pytest.importorskip("muon_torch")
    out = _run("cnn.py", "--epochs", "1")
    assert "conv2.weight" in out and "epoch 1" in out
