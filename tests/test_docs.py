"""The documentation site builds with --strict and documents every public symbol."""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("muon_core", "muon_torch", "muon_jax", "muon_conformance")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                             "-d", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _public(package: str) -> list[tuple[str, object]]:
    module = pytest.importorskip(package, exc_type=ImportError)
    assert hasattr(module, "__all__"), f"{package} has no __all__"
    return [(name, getattr(module, name)) for name in module.__all__]


@pytest.mark.parametrize("package", PACKAGES)
def test_public_symbols_have_docstrings(package):
    module = importlib.import_module(package)
    assert inspect.getdoc(module), f"{package} has no module docstring"
    missing = [name for name, obj in _public(package)
               if (inspect.isclass(obj) or callable(obj)) and not (obj.__doc__ or "").strip()]
    assert not missing, f"{package}: no docstring on {missing}"


@pytest.mark.parametrize("package", PACKAGES)
def test_public_symbols_are_on_an_api_page(site, package):
    pages = "".join(p.read_text(encoding="utf-8") for p in site.glob("api-*/index.html"))
    anchors = set(re.findall(r'id="([\w.]+)"', pages))
    # A lazily loaded name may be documented in its submodule: package.sub.name.
    missing = [name for name, _ in _public(package)
               if not any(a == f"{package}.{name}" or
                          (a.startswith(package + ".") and a.endswith("." + name))
                          for a in anchors)]
    assert not missing, f"{package}: not on any API page: {missing}"


def test_every_markdown_page_is_in_the_nav(site):
    built = {p.parent.name for p in site.glob("*/index.html")}
    pages = {p.stem for p in (ROOT / "docs").glob("*.md") if p.stem != "index"}
    assert pages <= built, f"not built: {sorted(pages - built)}"



def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


@pytest.mark.torch
def test_readme_torch_example_runs(monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    pytest.importorskip("muon_torch")
    monkeypatch.chdir(ROOT)
    ids = torch.randint(0, 96, (2, 4, 64))
    namespace = {"batches": [(ids[0], ids[1])]}
    exec(_python_blocks(ROOT / "README.md")[0], namespace)
    assert "h.0.attn.qkv.weight" in capsys.readouterr().out
    assert namespace["opt"].state, "the optimizer took no step"


@pytest.mark.jax
def test_readme_jax_example_runs(monkeypatch):
    pytest.importorskip("muon_jax")
    import jax.numpy as jnp

    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(_python_blocks(ROOT / "README.md")[1], namespace)
    ids = jnp.arange(128).reshape(2, 64) % 96
    params, _ = namespace["step"](namespace["params"], namespace["state"], ids, ids)
    before = namespace["params"]["h"]["0"]["mlp"]["fc"]["kernel"]
    assert not jnp.allclose(params["h"]["0"]["mlp"]["fc"]["kernel"], before)
