"""muon-core: the backend-neutral specification of the Muon optimizer.

Imports only the standard library and array-api-compat: config, routing plan, Newton-Schulz
on any Array API array, and the reference step every backend is checked against.
"""

from muon_core._adaptive import (
    adamuon,
    apply_second_moment,
    decayed_param,
    init_second_moment,
    normuon,
    second_moment_shape,
)
from muon_core._config import AdamWConfig, MuonConfig, Rule
from muon_core._ns import NSSchedule, ns_schedule, orthogonalize, resolve_dtype
from muon_core._owners import OwnerTable, assign_owners, ns_flops, param_ns_flops, total_ns_flops
from muon_core._plan import ParamPlan, Plan, lr_scale, plan
from muon_core._registry import available_backends, load_backend
from muon_core._shapes import gpt2_shapes
from muon_core._timing import interleaved_times, peer_schedule
from muon_core._reference import (
    check_gradients,
    from_matrices,
    init_state,
    momentum_update,
    muon_update,
    nonfinite_message,
    orthogonalized_blocks,
    reference_step,
    scaled_update,
    to_matrices,
)

__version__ = "0.1.0"

__all__ = [
    "AdamWConfig", "MuonConfig", "NSSchedule", "OwnerTable", "ParamPlan", "Plan", "Rule",
    "adamuon", "apply_second_moment", "decayed_param", "init_second_moment", "normuon",
    "orthogonalized_blocks", "scaled_update", "second_moment_shape",
    "assign_owners", "available_backends", "check_gradients", "from_matrices", "gpt2_shapes",
    "init_state", "interleaved_times", "load_backend", "lr_scale", "momentum_update",
    "muon_update", "nonfinite_message", "ns_flops", "ns_schedule", "orthogonalize",
    "param_ns_flops", "peer_schedule", "plan", "reference_step", "resolve_dtype", "to_matrices",
    "total_ns_flops",
]
