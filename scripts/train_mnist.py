"""Reproduce the built-in MNIST checkpoint: python scripts/train_mnist.py [--out PATH]."""

import argparse
from pathlib import Path

import torch

from lrp import models

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", default=str(Path(models.__file__).parent / "data" / models.CHECKPOINT))
parser.add_argument("--epochs", type=int, default=12)
args = parser.parse_args()
torch.set_num_threads(2)
model = models.train_mnist(epochs=args.epochs)
torch.save(model.state_dict(), args.out)
print(f"held-out accuracy {models.accuracy(model):.4f}; saved {args.out}")
