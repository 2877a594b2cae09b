"""A GPT-style character model trained with muon_torch on Python source code.

    python examples/char_gpt_torch.py --steps 300

Uses the config file beside it (shared with char_gpt_jax.py) and the model from
`muon_cli.torch_models`, so `muon plan examples/muon.toml` shows this model's routing.
"""

from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from muon_cli.data import (VOCAB, char_example_settings, char_windows, encode_chars,
                           python_source_text)
from muon_cli.torch_models import CharGPT
from muon_torch import Muon

CONFIG = Path(__file__).with_name("muon.toml")


def main() -> None:
    """Train and print the loss every 50 steps."""
    steps, cfg = char_example_settings(__doc__.splitlines()[0], str(CONFIG))
    torch.manual_seed(0)
    model = CharGPT(vocab=VOCAB, context=64)
    opt = Muon.for_model(model, cfg)
    print(opt.plan)
    ids, rng = encode_chars(python_source_text()), np.random.default_rng(0)
    for step in range(1, steps + 1):
        x, y = map(torch.from_numpy, char_windows(ids, 64, 32, rng))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
