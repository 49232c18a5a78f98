"""Built-in models, trained by this project: a small CNN on real MNIST digits (``mnist()``), and a text CNN
that tells spam from ham in the SpamAssassin corpus (``spam()``, see :mod:`lrp.spam`).

``lrp.models.mnist()`` returns it ready to use (eval mode, inputs ``(N, 1, 28, 28)`` in ``[0, 1]``).
The checkpoint is reproduced by ``python scripts/train_mnist.py`` (fixed seed; digits 0..7999 of the shipped
``mnist10k.npz`` for training, 8000..9999 held out).
"""

from __future__ import annotations

from importlib import resources
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

TRAIN_SPLIT = 8000  # digits [0, 8000) train the model, [8000, 10000) are held out
CHECKPOINT = "mnist_cnn.pt"


class MnistNet(nn.Sequential):
    """conv-relu-pool x2, then two dense layers: 10 logits for digits 0-9."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
        )


def _data_path(name: str):
    return resources.files("lrp").joinpath("data", name)


def mnist_digits(split: str = "test", limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Real MNIST digits shipped with lrp: images ``(N, 1, 28, 28)`` float32 in ``[0, 1]`` and labels.

    ``split``: ``"train"`` (8,000 digits), ``"test"`` (the 2,000 held out) or ``"all"``.
    """
    with _data_path("mnist10k.npz").open("rb") as f:
        data = np.load(f)
        images, labels = data["images"], data["labels"]
    if split == "train":
        images, labels = images[:TRAIN_SPLIT], labels[:TRAIN_SPLIT]
    elif split == "test":
        images, labels = images[TRAIN_SPLIT:], labels[TRAIN_SPLIT:]
    elif split != "all":
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    return x, torch.from_numpy(labels.astype(np.int64))


def mnist(pretrained: bool = True) -> MnistNet:
    """The built-in MNIST CNN in eval mode; ``pretrained=False`` gives random weights (for sanity checks)."""
    model = MnistNet()
    if pretrained:
        with _data_path(CHECKPOINT).open("rb") as f:
            model.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
    return model.eval()


def train_mnist(epochs: int = 12, seed: int = 0, batch_size: int = 64, log=print) -> MnistNet:
    """Train :class:`MnistNet` on the training split (Adam, random shifts of up to 2 pixels)."""
    torch.manual_seed(seed)
    x, y = mnist_digits("train")
    model = MnistNet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * (len(x) // batch_size + 1))
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            xb = x[idx]
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"epoch {epoch + 1}/{epochs}: held-out accuracy {accuracy(model):.4f}")
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, split: str = "test") -> float:
    was_training = model.training
    model.eval()
    x, y = mnist_digits(split)
    correct = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return correct


# the built-in spam classifier (lrp.spam): re-exported so that lrp.models lists every built-in model
from .spam import (SPAM_ACCURACY, SPAM_CLASSES, SpamMail, SpamNet, spam, spam_accuracy,  # noqa: E402,F401
                   spam_examples, spam_heldout)

# the built-in VQA model (lrp.vqa): an image and a question in, one of 19 answers out (lrp.datasets.shapes_vqa)
from .vqa import VQA_ACCURACY, VQA_ACCURACY_BY_TYPE, QuestionEncoder, VQANet, vqa, vqa_accuracy  # noqa: E402,F401
