"""muon-core: the backend-neutral specification of the Muon optimizer.

Imports only the standard library and array-api-compat: config, routing plan, Newton-Schulz
on any Array API array, and the reference step every backend is checked against.
"""

from muon_core._adaptive import (
    adamuon,
    apply_second_moment,
    init_second_moment,
    normuon,
    second_moment_shape,
)
from muon_core._architectures import name_kind, qkv_kind
from muon_core._checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from muon_core._config import AdamWConfig, MuonConfig, Rule
from muon_core._ns import (DeviceFacts, NSSchedule, auto_ns_dtype, describe_ns_dtype,
                           host_cpu_flags, ns_schedule, orthogonalize, resolve_dtype)
from muon_core._owners import (OwnerTable, ShapeStack, assign_adamw_owners, assign_owners,
                              ns_flops, pack_by_shape, packed_ns_flops, param_ns_flops,
                              total_ns_flops)
from muon_core._plan import ParamPlan, Plan, lr_scale, plan
from muon_core._qk_clip import QKClipConfig, QKRule, max_logits, qk_clip, qk_clip_scales
from muon_core._registry import available_backends, load_backend
from muon_core._tensor_parallel import (TP_MODES, TPCost, block_entry, blockwise_reference_step,
                                        chunk_sizes, tp_cost)
from muon_core._reference import (
    check_gradients,
    decay_factor,
    decayed_param,
    from_matrices,
    init_state,
    momentum_coefficients,
    momentum_update,
    muon_update,
    nonfinite_message,
    orthogonalized_blocks,
    reference_step,
    step_allowed,
    scaled_update,
    to_matrices,
)

__version__ = "0.1.0"

__all__ = [
    "AdamWConfig",
    "Checkpoint",
    "DeviceFacts",
    "MuonConfig",
    "NSSchedule",
    "OwnerTable",
    "ParamPlan",
    "Plan",
    "QKClipConfig",
    "QKRule",
    "Rule",
    "TPCost",
    "TP_MODES",
    "ShapeStack",
    "adamuon",
    "apply_second_moment",
    "assign_adamw_owners",
    "assign_owners",
    "auto_ns_dtype",
    "available_backends",
    "block_entry",
    "blockwise_reference_step",
    "check_gradients",
    "chunk_sizes",
    "decay_factor",
    "decayed_param",
    "describe_ns_dtype",
    "from_matrices",
    "host_cpu_flags",
    "init_second_moment",
    "init_state",
    "load_backend",
    "lr_scale",
    "max_logits",
    "momentum_coefficients",
    "momentum_update",
    "muon_update",
    "name_kind",
    "nonfinite_message",
    "normuon",
    "ns_flops",
    "ns_schedule",
    "orthogonalize",
    "orthogonalized_blocks",
    "pack_by_shape",
    "packed_ns_flops",
    "param_ns_flops",
    "plan",
    "qk_clip",
    "qk_clip_scales",
    "qkv_kind",
    "read_checkpoint",
    "reference_step",
    "resolve_dtype",
    "save_checkpoint",
    "scaled_update",
    "second_moment_shape",
    "step_allowed",
    "to_matrices",
    "total_ns_flops",
    "tp_cost",
]
