"""The conformance suite against the in-tree torch and JAX backends, inside the project's tests.

numpy and array-api-strict run in test_conformance_selftest.py; a backend whose framework is
not installed shows one skip with the reason.
"""

from muon_conformance import parametrize_with_checks


@parametrize_with_checks("torch")
def test_torch_backend_conforms(check):
    check()


@parametrize_with_checks("jax")
def test_jax_backend_conforms(check):
    check()
