"""muon-core: the backend-neutral specification of the Muon optimizer.

Imports only the standard library and array-api-compat: config, routing plan, Newton-Schulz
on any Array API array, and the reference step every backend is checked against.
"""

from muon_core._config import AdamWConfig, MuonConfig, Rule
from muon_core._ns import (DeviceFacts, NSSchedule, auto_ns_dtype, describe_ns_dtype,
                           host_cpu_flags, ns_schedule,
                           orthogonalize, resolve_dtype)
from muon_core._plan import ParamPlan, Plan, lr_scale, plan
from muon_core._registry import available_backends, load_backend
from muon_core._reference import (
    check_gradients,
    from_matrices,
    init_state,
    momentum_update,
    muon_update,
    nonfinite_message,
    reference_step,
    to_matrices,
)

__version__ = "0.1.0"

__all__ = [
    "AdamWConfig", "DeviceFacts", "MuonConfig", "NSSchedule", "ParamPlan", "Plan", "Rule",
    "auto_ns_dtype", "available_backends", "check_gradients", "describe_ns_dtype",
    "from_matrices", "host_cpu_flags", "init_state", "load_backend", "lr_scale",
    "momentum_update", "muon_update", "nonfinite_message", "ns_schedule", "orthogonalize",
    "plan", "reference_step", "resolve_dtype", "to_matrices",
]
