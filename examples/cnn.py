"""A small CNN on the bundled UCI digits, trained with muon_torch.

    python examples/cnn.py --epochs 5

Convolution kernels (out, in, kh, kw) are orthogonalized as (out, in*kh*kw) matrices; the
classifier, biases and batch-norm parameters go to AdamW (`print(opt.plan)` shows why).
"""

import argparse

import torch
from torch.nn import functional as F

from muon_cli.data import digits_split
from muon_cli.torch_models import DigitsCNN
from muon_core import MuonConfig
from muon_torch import Muon


def main() -> None:
    """Train, printing held-out accuracy after each epoch."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.02)
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y, x_test, y_test = map(torch.from_numpy, digits_split())
    model = DigitsCNN()
    opt = Muon.for_model(model, MuonConfig(lr=args.lr, weight_decay=0.0,
                                           adamw={"lr": 3e-3, "weight_decay": 0.0}))
    print(opt.plan)
    for epoch in range(1, args.epochs + 1):
        model.train()
        for batch in torch.randperm(len(y)).split(64):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch}  train loss {loss.item():.4f}  test accuracy {accuracy:.1%}")


if __name__ == "__main__":
    main()
