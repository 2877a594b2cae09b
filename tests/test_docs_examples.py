"""Every fenced ```python block of README.md and docs/*.md runs, so the examples cannot rot.

The blocks of one page run in order in one namespace, in a folder holding `muon.toml` (and
`examples/muon.toml`). What a reader supplies (`model`, `loader`, `params`, `loss_fn`, ...)
comes from the page's hidden prelude below. A block that cannot run here is preceded in the
page by `<!-- docs-test: skip REASON -->`; it is reported as skipped with that reason.
"""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[^\n]*\n(?P<code>.*?)^(?P=indent)```",
                   re.S | re.M)
MARKER = re.compile(r"<!--\s*docs-test:\s*skip\s+(?P<reason>.+?)\s*-->\s*$")

TORCH_MODEL = """
import torch
from torch.nn import functional as F
from muon_cli.torch_models import CharGPT
MyTransformer = CharGPT
model = CharGPT()
ids = torch.randint(0, 96, (2, 4, 64))
loader = batches = [(ids[0], ids[1])]
loss_fn = lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten())
"""
TORCH_GROUPS = """
blocks = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
head, experts = torch.nn.Linear(16, 10), torch.nn.Linear(16, 16, bias=False)  # weights only
from muon_core import MuonConfig
cfg = MuonConfig()
"""
JAX_MODEL = """
import jax, jax.numpy as jnp, optax
from muon_cli.jax_models import char_gpt, init_char_gpt
params = init_char_gpt(jax.random.key(0))
def loss_fn(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(char_gpt(params, x), y).mean()
"""
WRITING_A_BACKEND = """
import copy
import numpy as np
from muon_conformance.adapter import BF16, FLOAT64
from muon_conformance.adapters import TorchHandle, _require
"""
# Run before a page's blocks, or (page, block index) before that block.
PRELUDES = {"README.md": TORCH_MODEL, ("getting-started.md", 0): TORCH_MODEL,
            ("getting-started.md", 1): JAX_MODEL, "torch.md": TORCH_MODEL + TORCH_GROUPS,
            "jax.md": JAX_MODEL, "writing-a-backend.md": WRITING_A_BACKEND}
# Each framework a page's examples need: skipped (with the reason) where it is not installed.
NEEDS = {"README.md": ("torch", "jax"), "getting-started.md": ("torch", "jax"),
         "torch.md": ("torch",), "jax.md": ("jax",), "writing-a-backend.md": ("torch",)}


def _blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) of each python block, code dedented as the
    site renders it."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        blocks.append((text.count("\n", 0, match.start()) + 1, textwrap.dedent(match["code"]),
                       marker["reason"] if marker else None))
    return blocks


CASES = [pytest.param(page, i, id=f"{page.relative_to(ROOT)}:{line}")
         for page in PAGES for i, (line, _, _) in enumerate(_blocks(page))]


@pytest.fixture
def in_example_folder(tmp_path, monkeypatch):
    """A working folder with the example config as `muon.toml` and `examples/muon.toml`."""
    (tmp_path / "examples").mkdir()
    for target in (tmp_path / "muon.toml", tmp_path / "examples" / "muon.toml"):
        shutil.copy(ROOT / "examples" / "muon.toml", target)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("page,index", CASES)
def test_doc_block_runs(page, index, in_example_folder, capsys):
    blocks = _blocks(page)
    _, _, reason = blocks[index]
    if reason:
        pytest.skip(f"{page.name}: {reason}")
    for module in NEEDS.get(page.name, ()):
        pytest.importorskip(module)
    namespace: dict = {"__name__": "docs_example"}
    exec(PRELUDES.get(page.name, ""), namespace)
    for i, (line, code, skip) in enumerate(blocks[:index + 1]):  # earlier blocks set up later ones
        if not skip:
            exec(PRELUDES.get((page.name, i), ""), namespace)
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)


def test_the_collector_finds_indented_blocks_and_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("- item:\n\n  ```python\n  x = 1\n  ```\n\n<!-- docs-test: skip needs a GPU -->\n"
                    "```python\ny = 2\n```\n", encoding="utf-8")
    assert _blocks(page) == [(3, "x = 1\n", None), (8, "y = 2\n", "needs a GPU")]
