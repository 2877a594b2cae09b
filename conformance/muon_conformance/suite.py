"""The conformance suite as a pytest module: one test, parametrized by the plugin with every
case of the backend named by `--muon-backend`."""


def test_conformance(muon_check):
    """Run one conformance case."""
    muon_check()
