"""muon_torch: the Muon optimizer as a native `torch.optim.Optimizer`.

`Muon` runs Muon on the matrices `muon_core.plan` routes to it (batched Newton-Schulz, bf16 by
default) and AdamW on every other parameter, with torch.optim's conventions.
"""

from muon_torch._checkpoint import load, save
from muon_torch._model import module_kinds
from muon_torch._newton_schulz import frobenius_norm, newton_schulz
from muon_torch._optimizer import Muon
from muon_torch._qk_clip import record_qk_max

__all__ = ["Muon", "frobenius_norm", "load", "module_kinds", "newton_schulz", "record_qk_max",
           "save"]
