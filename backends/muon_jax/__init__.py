"""muon_jax: the Muon optimizer as optax gradient transformations.

`tx = muon_jax.muon(cfg)` takes the same `muon_core.MuonConfig` as the torch backend and
returns an `optax.GradientTransformation` over any pytree of parameters.
"""

from muon_jax._ns import orthogonalize
from muon_jax._transform import (
    MuonState,
    NonfiniteRecord,
    ScaleByMuonState,
    leaf_names,
    muon,
    plan_for,
    raise_if_nonfinite,
    scale_by_muon,
)
from muon_jax._qk_clip import qk_clip, qk_max

__all__ = ["MuonState", "NonfiniteRecord", "ScaleByMuonState", "leaf_names", "muon",
           "orthogonalize", "plan_for", "raise_if_nonfinite", "scale_by_muon"]
__all__ += ["qk_clip", "qk_max"]
