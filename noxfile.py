"""The backend matrix: the core alone, each backend, the conformance suite per backend, docs."""

import nox

nox.options.sessions = ["core", "torch", "jax", "conformance", "docs"]
nox.options.default_venv_backend = "venv"
BACKENDS = ["numpy", "array_api_strict", "torch", "jax"]
TORCH = ["torch==2.13.0"]
JAX = ["jax==0.10.2", "jaxlib==0.10.2", "optax==0.2.8"]
# The JAX mutation run's cases: one compiled program per config makes the whole suite too slow
# to run once per mutant on a small machine (docs/conformance.md, mutation testing).
JAX_MUTATION_CASES = ["--checks", "trajectory,routing,state,resume,bad_inputs,inputs_unchanged,"
                      "qk_clip", "-k", "defaults or wrong_shape or fused_gqa"]


@nox.session
def core(session: nox.Session) -> None:
    """muon_core on numpy and array-api-strict, with neither torch nor jax installed."""
    session.install("-r", "requirements/core.txt", "-e", ".")
    session.run("python", "-m", "pytest", "tests/test_core_ns.py", "tests/test_core_plan.py",
                "tests/test_core_config.py", "tests/test_core_imports.py",
                "tests/test_core_reference.py", "tests/test_conformance_selftest.py",
                "tests/test_conformance_plugin.py", *session.posargs)
    for backend in ("numpy", "array_api_strict"):
        session.run("python", "-m", "muon_conformance", "--backend", backend)


@nox.session
def torch(session: nox.Session) -> None:
    """muon_torch's own tests."""
    session.install("-r", "requirements/core.txt", *TORCH, "expecttest==0.3.0", "-e", ".[torch]")
    session.run("python", "-m", "pytest", *_tests(session, "test_torch_*.py"), *session.posargs)


@nox.session
def jax(session: nox.Session) -> None:
    """muon_jax's own tests."""
    session.install("-r", "requirements/core.txt", *JAX, "-e", ".[jax]")
    session.run("python", "-m", "pytest", *_tests(session, "test_jax_*.py"), *session.posargs)


@nox.session
@nox.parametrize("backend", BACKENDS)
def conformance(session: nox.Session, backend: str) -> None:
    """The conformance suite against one backend."""
    extra = {"torch": TORCH, "jax": JAX}.get(backend, [])
    session.install("-r", "requirements/core.txt", *extra, "-e", ".")
    session.run("python", "-m", "muon_conformance", "--backend", backend, *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """Long trajectories and multi-process checks (marked `slow`)."""
    session.install("-r", "requirements/test.txt")
    session.run("python", "-m", "pytest", "-m", "slow", *session.posargs)
    for backend in BACKENDS:
        session.run("python", "-m", "muon_conformance", "--backend", backend, "--slow")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site, built with --strict."""
    session.install("-r", "requirements/test.txt")
    session.run("mkdocs", "build", "--strict")


@nox.session
def bench(session: nox.Session) -> None:
    """Side-by-side benchmarks against torch.optim.Muon and optax.contrib.muon."""
    session.install("-r", "requirements/test.txt")
    session.run("muon", "bench", *session.posargs)


@nox.session
@nox.parametrize("backend", ["torch", "jax"])
def mutation(session: nox.Session, backend: str) -> None:
    """Mutation score of a backend under the conformance suite on a seeded sample of mutants
    (benchmarks/mutation.py, docs/conformance.md); arguments after `--` replace the defaults."""
    session.install("-r", "requirements/mutation.txt")
    defaults = {"torch": ["--sample", "24", "--timeout", "400"],
                "jax": ["--sample", "10", "--timeout", "400", *JAX_MUTATION_CASES]}[backend]
    session.run("python", "benchmarks/mutation.py", "--backend", backend, "--seed", "0",
                *(session.posargs or defaults), env={"OMP_NUM_THREADS": "1"})


def _tests(session: nox.Session, pattern: str) -> list[str]:
    import glob

    files = sorted(glob.glob(f"tests/{pattern}"))
    if not files:
        session.error(f"no test files match tests/{pattern}")
    return files
