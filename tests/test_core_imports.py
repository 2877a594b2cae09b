"""`import muon_core` must stay light: no numpy, torch or jax at import time."""

import subprocess
import sys


def test_import_pulls_in_no_array_library():
    code = ("import sys, muon_core; "
            "print(sorted(m for m in ('numpy', 'torch', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_symbols_are_exported_and_documented():
    import muon_core

    for name in muon_core.__all__:
        obj = getattr(muon_core, name)
        assert obj.__doc__ and obj.__doc__.strip(), f"muon_core.{name} has no docstring"
