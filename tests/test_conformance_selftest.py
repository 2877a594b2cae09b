"""The conformance suite tests itself: deliberately broken adapters must each be caught by the
check that targets their defect, and the correct in-tree adapters must pass every check.

Each broken adapter is the numpy reference adapter with exactly one thing changed. "No transpose
for tall matrices" is modelled as transposing a tall matrix for Newton-Schulz and reshaping the
result back instead of transposing it: skipping the transpose altogether computes the same
polynomial (`X (XᵀX)ᵏ = (XXᵀ)ᵏ X`), costs more but is not wrong, so no check can or should fail.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from muon_core import (blockwise_reference_step, from_matrices, lr_scale, ns_schedule, plan,
                       reference_step, to_matrices)
from muon_core._tensor_parallel import is_plain_matrix
from muon_conformance import run_checks
from muon_conformance.adapter import TENSOR_PARALLEL
from muon_conformance.adapters import NumpyAdapter, StrictAdapter

KELLER_TYPO = (3.4445, -4.7750, 2.0135)  # c should be 2.0315


class WrongCoefficient(NumpyAdapter):
    """Keller's c coefficient mistyped."""

    def make(self, params, config):
        if config.ns_coefficients == "keller":
            config = config.replace(ns_coefficients=KELLER_TYPO)
        return super().make(params, config)


class NesterovIgnored(NumpyAdapter):
    """Always plain momentum, whatever `nesterov` says."""

    def make(self, params, config):
        return super().make(params, config.replace(nesterov=False))


class WrongLrScale(NumpyAdapter):
    """LR scale computed for (in, out) instead of (out, in)."""

    def make(self, params, config):
        handle = super().make(params, config)
        entries = [dataclasses.replace(e, lr_scales=tuple(
            lr_scale(e.matrix_shape[2], rows, config.lr_scaling) for rows in e.blocks))
            if e.is_muon else e for e in handle.plan]
        handle.plan = dataclasses.replace(handle.plan, entries=tuple(entries))
        return handle


class _EditsMuonSteps(NumpyAdapter):
    """Takes the reference step, then rewrites each Muon parameter's result with `edit`."""

    def edit(self, entry, old, new, config):
        raise NotImplementedError

    def step(self, handle, grads):
        old = dict(handle.params)
        handle = super().step(handle, grads)
        for entry in handle.plan.muon:
            handle.params[entry.name] = self.edit(entry, old[entry.name],
                                                  handle.params[entry.name], handle.config)
        return handle


class NoTransposeBack(_EditsMuonSteps):
    """A tall matrix is transposed for Newton-Schulz and reshaped, not transposed, back."""

    def edit(self, entry, old, new, config):
        _, rows, cols = entry.matrix_shape
        if old.ndim != 2 or rows <= cols:
            return new
        decayed = old * (1 - config.lr * config.weight_decay)
        update = (decayed - new) / config.lr
        return decayed - config.lr * update.T.reshape(update.shape)


class DecayWithScaledLr(_EditsMuonSteps):
    """Weight decay multiplied by the shape's LR scale: `p (1 - lr scale wd)`."""

    def edit(self, entry, old, new, config):
        row_scales = np.repeat(entry.lr_scales, entry.blocks)[:, None]
        extra = to_matrices(old, entry) * (row_scales - 1.0) * config.lr * config.weight_decay
        return new - from_matrices(extra, entry)


class MomentumNotSaved(NumpyAdapter):
    """The snapshot leaves the Muon momentum buffers out."""

    def save(self, handle):
        return {name: entry for name, entry in super().save(handle).items()
                if "momentum_buffer" not in entry}


# broken adapter -> (check that must catch it, a case it must fail, parameter named)
BROKEN = {
    WrongCoefficient: ("ns_golden", "ns_golden[keller_diag34-float32]", "m.weight"),
    NesterovIgnored: ("trajectory", "trajectory[defaults]", "weight"),
    NoTransposeBack: ("trajectory", "trajectory[defaults]", "'tall.weight'"),
    WrongLrScale: ("trajectory", "trajectory[defaults]", "'tall.weight'"),
    DecayWithScaledLr: ("trajectory", "trajectory[defaults]", "'tall.weight'"),
    MomentumNotSaved: ("resume", "resume[defaults]", "weight"),
}


def test_the_typo_is_a_real_change():
    # Guard against a vacuous self-test: the perturbed schedule differs from keller's.
    assert ns_schedule(KELLER_TYPO).coefficients != ns_schedule("keller").coefficients


@pytest.mark.parametrize("broken", BROKEN, ids=lambda cls: cls.__name__)
def test_broken_adapter_is_caught(broken):
    check, case, named = BROKEN[broken]
    failures = run_checks(broken(), [check])
    assert case in failures, f"{broken.__name__} passed {check}: {sorted(failures)}"
    message = failures[case]
    assert f"check {case}" in message and named in message
    assert "exceeds the" in message or "expected" in message


def test_no_transpose_back_is_also_caught_by_the_transpose_invariant():
    failures = run_checks(NoTransposeBack(), ["ns_invariants"])
    assert "ns_invariants[transpose-float32]" in failures


@pytest.mark.parametrize("broken", [WrongCoefficient, NesterovIgnored, WrongLrScale,
                                    DecayWithScaledLr, NoTransposeBack])
def test_state_only_defects_are_left_to_resume(broken):
    # The trajectory defects keep save/restore intact: resume alone must not flag them.
    assert run_checks(broken(), ["resume"]) == {}


def test_momentum_not_saved_follows_the_reference_until_restored():
    # Only the resume check sees it: a single uninterrupted run is correct.
    assert run_checks(MomentumNotSaved(), ["trajectory", "state"]) == {}


@pytest.mark.parametrize("adapter", [NumpyAdapter, StrictAdapter], ids=lambda c: c.name)
def test_correct_adapters_pass_every_check(adapter):
    assert run_checks(adapter()) == {}


class SecondMomentIgnored(NumpyAdapter):
    """Plain Muon whatever `second_moment` says."""

    def make(self, params, config):
        return super().make(params, config.replace(second_moment="none"))


class CautiousDecayIgnored(NumpyAdapter):
    """Decays every entry whatever `cautious_weight_decay` says."""

    def make(self, params, config):
        return super().make(params, config.replace(cautious_weight_decay=False))


class SecondMomentNotSaved(NumpyAdapter):
    """The snapshot leaves the second moments out (a restored run starts them from zero)."""

    def save(self, handle):
        return {name: {k: v for k, v in entry.items() if k != "second_moment"}
                for name, entry in super().save(handle).items()}


BROKEN_ADAPTIVE = {
    SecondMomentIgnored: ("adaptive_trajectory", "adaptive_trajectory[normuon]", "weight"),
    CautiousDecayIgnored: ("adaptive_trajectory",
                           "adaptive_trajectory[cautious_weight_decay]", "weight"),
    SecondMomentNotSaved: ("adaptive_resume", "adaptive_resume[adamuon]", "weight"),
}


@pytest.mark.parametrize("broken", BROKEN_ADAPTIVE, ids=lambda cls: cls.__name__)
def test_broken_adaptive_adapter_is_caught(broken):
    check, case, named = BROKEN_ADAPTIVE[broken]
    failures = run_checks(broken(), [check])
    assert case in failures, f"{broken.__name__} passed {check}: {sorted(failures)}"
    assert f"check {case}" in failures[case] and named in failures[case]


class PiecesAlone(NumpyAdapter):
    """Tensor parallelism in which each rank orthogonalizes its own piece whatever `tp_mode`
    says: blockwise Muon (`muon_core.blockwise_reference_step`), right only for "blockwise".
    Blockwise Muon has no second moment, so adaptive configs take the whole-matrix reference
    step: only the plain-Muon case tells the pieces apart."""

    capabilities = NumpyAdapter.capabilities | {TENSOR_PARALLEL}

    def __init__(self, tp_modes=("duplicated", "distributed", "blockwise")):
        self.tp_modes = tp_modes

    def run_tensor_parallel(self, params, grads, world_size, runs):
        finals = []
        for config, cuts in runs:
            entries = plan({name: p.shape for name, p in params.items()}, config).muon
            pieces = {e.name: (cuts[e.name], world_size) for e in entries
                      if e.name in cuts and is_plain_matrix(e)}
            current, state = dict(params), None
            adaptive = config.second_moment != "none" or config.cautious_weight_decay
            for grad in grads:
                current, state = (reference_step(current, grad, state, config) if adaptive else
                                  blockwise_reference_step(current, grad, state, config, pieces))
            finals.append(current)
        return finals


def test_pieces_orthogonalized_alone_are_caught_by_tensor_parallel():
    failures = run_checks(PiecesAlone(), ["tensor_parallel"])
    message = failures["tensor_parallel[defaults]"]
    assert "2 ranks, duplicated" in message and "exceeds the" in message, message


def test_blockwise_muon_passes_the_blockwise_tensor_parallel_mode():
    # The same adapter is right where blockwise Muon is what the mode defines.
    assert run_checks(PiecesAlone(tp_modes=("blockwise",)), ["tensor_parallel"]) == {}
