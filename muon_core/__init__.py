"""muon-core: the backend-neutral specification of the Muon optimizer.

Imports only the standard library and array-api-compat: config, routing plan, Newton-Schulz
on any Array API array, and the reference step every backend is checked against.
"""

from muon_core._checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from muon_core._config import AdamWConfig, MuonConfig, Rule
from muon_core._ns import NSSchedule, ns_schedule, orthogonalize, resolve_dtype
from muon_core._owners import OwnerTable, assign_owners, ns_flops, param_ns_flops, total_ns_flops
from muon_core._plan import ParamPlan, Plan, lr_scale, plan
from muon_core._qk_clip import QKClipConfig, QKRule, max_logits, qk_clip, qk_clip_scales
from muon_core._registry import available_backends, load_backend
from muon_core._shapes import gpt2_shapes
from muon_core._timing import interleaved_times, peer_schedule
from muon_core._reference import (
    check_gradients,
    decay_factor,
    from_matrices,
    init_state,
    momentum_coefficients,
    momentum_update,
    muon_update,
    nonfinite_message,
    reference_step,
    step_allowed,
    to_matrices,
)

__version__ = "0.1.0"

__all__ = [
    "AdamWConfig",
    "Checkpoint",
    "MuonConfig",
    "NSSchedule",
    "OwnerTable",
    "ParamPlan",
    "Plan",
    "QKClipConfig",
    "QKRule",
    "Rule",
    "assign_owners",
    "available_backends",
    "check_gradients",
    "decay_factor",
    "from_matrices",
    "gpt2_shapes",
    "init_state",
    "interleaved_times",
    "load_backend",
    "lr_scale",
    "max_logits",
    "momentum_coefficients",
    "momentum_update",
    "muon_update",
    "nonfinite_message",
    "ns_flops",
    "ns_schedule",
    "orthogonalize",
    "param_ns_flops",
    "peer_schedule",
    "plan",
    "qk_clip",
    "qk_clip_scales",
    "read_checkpoint",
    "reference_step",
    "resolve_dtype",
    "save_checkpoint",
    "step_allowed",
    "to_matrices",
    "total_ns_flops",
]
