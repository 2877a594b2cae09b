"""muon_jax: the Muon optimizer as optax gradient transformations.

`tx = muon_jax.muon(cfg)` takes the same `muon_core.MuonConfig` as the torch backend and
returns an `optax.GradientTransformationExtraArgs` over any pytree of parameters.

Modules: `_plan` (leaf names, `plan_for`), `_hyper` (overrides, injectable hyper-parameters),
`_checks` (validation), `_nonfinite` (the NaN/Inf policy), `_sharding`, `_ns` (Newton-Schulz),
`_transform` (`scale_by_muon`, `muon`).
"""

from muon_jax._checkpoint import load, save
from muon_jax._nonfinite import NonfiniteRecord, raise_if_nonfinite
from muon_jax._ns import orthogonalize
from muon_jax._plan import leaf_names, plan_for
from muon_jax._transform import MuonState, ScaleByMuonState, muon, scale_by_muon
from muon_jax._qk_clip import qk_clip, qk_max

__all__ = [
    "MuonState",
    "NonfiniteRecord",
    "ScaleByMuonState",
    "leaf_names",
    "load",
    "muon",
    "orthogonalize",
    "plan_for",
    "qk_clip",
    "qk_max",
    "raise_if_nonfinite",
    "save",
    "scale_by_muon",
]
