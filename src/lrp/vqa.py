"""The built-in visual question answering model: a small FiLM network trained by this project on Shapes VQA
(:mod:`lrp.datasets.shapes_vqa`), explained with one call over both of its inputs.

``lrp.models.vqa()`` returns ``(model, encoder)``: :class:`VQANet` in eval mode, which maps an image
``(N, 3, 64, 64)`` (RGB in ``[0, 1]``) and question ids ``(N, L)`` (long, left-padded with 0) to logits
``(N, 19)`` over :data:`~lrp.datasets.shapes_vqa.ANSWERS`, and a :class:`QuestionEncoder` that turns questions
into ids (and names unknown words). ``lrp.explain(model, (image, ids))`` gives relevance for the pixels and for
the question's words at once::

    model, encoder = lrp.models.vqa()
    q = lrp.datasets.shapes_vqa.test_set(1)[0]
    res = lrp.explain(model, (images(q.image), encoder.encode(q.text)))
    pixels, words = res.relevance               # (1, 3, 64, 64), (1, n)

Architecture (FiLM, Perez et al. 2018, in small): four convolutions, each followed by a per-channel scale
(:class:`ChannelScale`: batch norm without the shift) and ReLU, turn the image into a 16 x 16 map of 32 channels
(:meth:`VQANet.features`: what is where, each cell seeing 24 x 24 pixels). The question, word embeddings read by
a GRU, gives a scale ``gamma`` and a shift ``beta`` per channel for two FiLM blocks, ``relu(h + gamma * h +
beta)`` after a 1x1 and a 3x3 convolution (64 channels), which pick out what the question asks about. Per
channel, its mass (the sum over the map) and where it lies (the mean column, -1 left to +1 right, weighted by
``h^2``) go to two dense layers over the 19 answers. The mean column divides by the channel's total, which lrp
holds fixed (a normalisation), so relevance passes through it linearly.

Relevance: nothing in the network has a bias, so the pixels' and the words' relevance together add up to the
explained logit (up to the rules' stabilisers). Where the question meets the image (``gamma * h``) each factor
gets half of the product's relevance (lrp's rule for a product of two signals), and ``beta`` its share of the
sum; FiLM is written ``h + gamma * h`` rather than ``(1 + gamma) * h`` so that no constant takes relevance.
Padding ids have a zero embedding and the GRU no bias, so left padding leaves the GRU's state at zero: a padded
question gets the answer and relevance it gets alone, and padding gets no relevance.

The checkpoint (``data/vqa_film.pt``, see ``data/VQA-README.md``) is made by ``python scripts/train_vqa.py``
(fixed seed); :data:`VQA_ACCURACY` is its accuracy on the 1,000 held-out questions of
:func:`lrp.datasets.shapes_vqa.test_set`.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .datasets.shapes_vqa import (ANSWERS, IMAGE_SIZE, PAD_ID, QUESTION_TYPES, VOCABULARY, Question,
                                  decode_question, encode_question, test_set, tokenize)

Tensor = torch.Tensor

VQA_CHECKPOINT = "vqa_film.pt"
# held-out accuracy of the shipped checkpoint on the 1,000 questions of shapes_vqa.test_set() (train_vqa.py prints it)
VQA_ACCURACY = 0.962
VQA_ACCURACY_BY_TYPE: dict[str, float] = {"exist": 0.985, "query_colour": 0.995, "query_shape": 0.985, "count": 0.945,
                                          "relate": 0.9}


class ChannelScale(nn.Module):
    """Batch norm without the shift: each channel divided by its root mean square (over the batch while training,
    a running estimate in eval mode) and, with ``affine``, multiplied by a learnt scale. In eval mode it is a
    constant factor per channel, so the network keeps no bias and LRP conserves relevance through it."""

    running_ms: Tensor

    def __init__(self, channels: int, affine: bool = True, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None
        self.register_buffer("running_ms", torch.ones(channels))
        self.momentum, self.eps = momentum, eps

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            ms = x.pow(2).mean((0, 2, 3))
            with torch.no_grad():
                self.running_ms.lerp_(ms.detach(), self.momentum)
        else:
            ms = self.running_ms
        scale = torch.rsqrt(ms + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        return x * scale.view(1, -1, 1, 1)


class VQANet(nn.Module):
    """Image ``(N, 3, 64, 64)`` in ``[0, 1]`` and question ids ``(N, L)`` (left-padded with 0) -> logits
    ``(N, len(ANSWERS))``; see the module docstring."""

    columns: Tensor  # (1, 1, 1, 16): each cell column's place, -1 (left) to +1 (right)

    def __init__(self, vocab_size: int = len(VOCABULARY), num_answers: int = len(ANSWERS), width: int = 32,
                 channels: int = 64, embed: int = 32, hidden: int = 64, dense: int = 128,
                 image_size: int = IMAGE_SIZE):
        super().__init__()
        self.config = {"vocab_size": vocab_size, "num_answers": num_answers, "width": width, "channels": channels,
                       "embed": embed, "hidden": hidden, "dense": dense, "image_size": image_size}
        self.answers = ANSWERS
        self.vocabulary = VOCABULARY
        self.accuracy: Optional[float] = None  # held-out accuracy, set by the loader
        self.image_size, self.channels = image_size, channels

        def conv(cin: int, cout: int, kernel: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=1, bias=False), ChannelScale(cout),
                    nn.ReLU()]

        # what is where: 64 -> 32 -> 16 pixels, each cell of the 16 x 16 map seeing 24 x 24 pixels
        self.stem = nn.Sequential(*conv(3, 16, 4, 2), *conv(16, width, 3, 2), *conv(width, width, 3, 1),
                                  *conv(width, width, 3, 1))
        self.embedding = nn.Embedding(vocab_size, embed, padding_idx=PAD_ID)
        self.gru = nn.GRU(embed, hidden, batch_first=True, bias=False)
        self.film = nn.Linear(hidden, 4 * channels, bias=False)  # gamma and beta for two blocks
        self.conv1 = nn.Conv2d(width, channels, 1, bias=False)
        self.norm1 = ChannelScale(channels, affine=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = ChannelScale(channels, affine=False)
        self.classifier = nn.Sequential(nn.Linear(2 * channels, dense, bias=False), nn.ReLU(),
                                        nn.Linear(dense, num_answers, bias=False))
        side = image_size // 4
        self.register_buffer("columns", ((torch.arange(side) + 0.5) / side * 2 - 1).view(1, 1, 1, side),
                             persistent=False)

    def question(self, ids: Tensor) -> Tensor:
        """``(N, hidden)``: the GRU's last state (left padding keeps it at zero until the words start)."""
        _, h = self.gru(self.embedding(ids))
        return h[0]

    def features(self, image: Tensor) -> Tensor:
        """``(N, width, 16, 16)``: what the image holds where, before the question is read."""
        if image.ndim != 4 or image.shape[1] != 3 or tuple(image.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(f"the image must be (N, 3, {self.image_size}, {self.image_size}) RGB in [0, 1], got "
                             f"{tuple(image.shape)}")
        return self.stem(image)

    def forward(self, image: Tensor, ids: Tensor) -> Tensor:
        return self.answer(self.features(image), ids)

    def answer(self, f: Tensor, ids: Tensor) -> Tensor:
        """The logits from the image's :meth:`features` and the question."""
        if ids.ndim != 2 or ids.shape[0] != f.shape[0]:
            raise ValueError(f"the question ids must be (N, L) with N = {f.shape[0]} (one row per image), got "
                             f"{tuple(ids.shape)}")
        film = self.film(self.question(ids)).view(-1, 2, 2, self.channels, 1, 1)
        # FiLM: (1 + gamma) * h + beta, written h + gamma * h + beta so that no constant takes relevance
        h = self.norm1(self.conv1(f))
        h = torch.relu(h + film[:, 0, 0] * h + film[:, 0, 1])
        h2 = self.norm2(self.conv2(h))
        h = torch.relu(h2 + film[:, 1, 0] * h2 + film[:, 1, 1])
        # per channel: how much of it there is, and where it lies from left (-1) to right (+1), weighted by h^2
        mass = h.sum((2, 3)) / h.shape[-1]
        weight = h * h
        where = (weight * self.columns).sum((2, 3)) / (weight.sum((2, 3)) + 1e-2)
        return self.classifier(torch.cat([mass, where], 1))


class QuestionEncoder:
    """Questions -> ids for :class:`VQANet` (the word-level vocabulary of :mod:`lrp.datasets.shapes_vqa`)."""

    vocabulary = VOCABULARY
    answers = ANSWERS
    pad_id = PAD_ID

    def tokens(self, text: str) -> list[str]:
        """The words the model reads (lower-cased, punctuation dropped)."""
        return tokenize(text)

    def ids(self, text: str) -> list[int]:
        """The ids of a question; unknown words and empty questions raise
        (:class:`~lrp.datasets.shapes_vqa.UnknownWordError`, :class:`~lrp.datasets.shapes_vqa.EmptyQuestionError`,
        both :class:`lrp.errors.InputError`)."""
        return encode_question(text)

    def encode(self, text: str) -> Tensor:
        """One question as the model's input ``(1, n)``."""
        return torch.tensor([encode_question(text)], dtype=torch.long)

    def batch(self, texts: Sequence[str]) -> Tensor:
        """Several questions ``(N, longest)``, left-padded with :data:`PAD_ID`."""
        return pad_ids([encode_question(t) for t in texts])

    def decode(self, ids: Union[Tensor, Sequence[int]]) -> list[str]:
        """The words of a row of ids, padding dropped."""
        values = ids.reshape(-1).tolist() if isinstance(ids, Tensor) else list(ids)
        return decode_question(values)

    def __repr__(self) -> str:
        return f"QuestionEncoder({len(VOCABULARY) - 1} words, {len(ANSWERS)} answers)"


def pad_ids(rows: Sequence[Sequence[int]]) -> Tensor:
    """Rows of ids as ``(N, longest)``, left-padded with :data:`PAD_ID` (so that the GRU reads the words last)."""
    n = max((len(r) for r in rows), default=0)
    return torch.tensor([[PAD_ID] * (n - len(r)) + list(r) for r in rows], dtype=torch.long).reshape(len(rows), n)


def images(pictures: Union[np.ndarray, Sequence[np.ndarray]]) -> Tensor:
    """``uint8`` images ``(H, W, 3)`` (one, or a sequence or a stacked ``(N, H, W, 3)`` array) as the model's
    input: float ``(N, 3, H, W)`` in ``[0, 1]``."""
    arr = np.asarray(pictures) if isinstance(pictures, np.ndarray) else np.stack([np.asarray(p) for p in pictures])
    if arr.ndim == 3:
        arr = arr[None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2))).float().div_(255.0)


def batch(questions: Sequence[Question]) -> tuple[Tensor, Tensor, Tensor]:
    """Questions as ``(images (N, 3, 64, 64), ids (N, L) left-padded, answers (N,))``."""
    return (images([q.image for q in questions]), pad_ids([q.ids for q in questions]),
            torch.tensor([q.answer_id for q in questions], dtype=torch.long))


def _data_path(name: str) -> Any:
    return resources.files("lrp").joinpath("data", name)


def vqa(pretrained: bool = True) -> tuple[VQANet, QuestionEncoder]:
    """``(model, encoder)``: the built-in VQA model in eval mode (``model.accuracy``: its held-out accuracy) and
    its :class:`QuestionEncoder`. ``pretrained=False``: random weights (for sanity checks)."""
    if not pretrained:
        return VQANet().eval(), QuestionEncoder()
    with _data_path(VQA_CHECKPOINT).open("rb") as f:
        ckpt = torch.load(f, map_location="cpu", weights_only=True)
    model = VQANet(**ckpt["config"])
    model.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()})
    model.accuracy = float(ckpt["accuracy"])
    return model.eval(), QuestionEncoder()


class Accuracy(NamedTuple):
    """``overall`` accuracy, ``by_type`` (question type -> accuracy) and ``correct`` (one bool per question)."""

    overall: float
    by_type: dict[str, float]
    correct: list[bool]


@torch.no_grad()
def vqa_accuracy(model: Optional[nn.Module] = None, questions: Optional[Sequence[Question]] = None,
                 batch_size: int = 250) -> Accuracy:
    """Answer accuracy of ``model`` (default: the built-in one) on ``questions`` (default: the 1,000 held-out
    questions of :func:`lrp.datasets.shapes_vqa.test_set`), overall and per question type."""
    if model is None:
        model, _ = vqa()
    questions = test_set() if questions is None else list(questions)
    was_training = model.training
    model.eval()
    correct: list[bool] = []
    for i in range(0, len(questions), batch_size):
        x, ids, y = batch(questions[i:i + batch_size])
        correct += (model(x, ids).argmax(1) == y).tolist()
    model.train(was_training)
    by_type = {}
    for t in QUESTION_TYPES:
        hits = [c for c, q in zip(correct, questions) if q.type == t]
        if hits:
            by_type[t] = sum(hits) / len(hits)
    return Accuracy(sum(correct) / max(len(correct), 1), by_type, correct)


class Answer(NamedTuple):
    """The model's answer to a question about an image, with its probability, and the relevance of each pixel
    (``image``: ``(H, W)``, channels summed) and of each word (``words``: ``(n,)``, for ``tokens``) for the
    explained answer (``explained``: the predicted one unless a target was named); ``probabilities``: one per
    answer of :data:`ANSWERS`."""

    answer: str
    probability: float
    explained: str
    tokens: list[str]
    image: Tensor
    words: Tensor
    score: float
    probabilities: list[float]


def ask(image: Union[np.ndarray, Tensor], question: str, target: Union[None, int, str] = None,
        composite: Any = "epsilon-plus-flat", model: Optional[VQANet] = None) -> Answer:
    """Ask the built-in model (or ``model``) a question about an image (``uint8`` ``(H, W, 3)`` or a float tensor
    ``(3, H, W)`` in ``[0, 1]``) and explain its answer (or the answer ``target``, a word of
    :data:`ANSWERS` or its index) over the pixels and the words, in one :func:`lrp.explain` call."""
    from .errors import TargetError
    from .explain import explain

    if model is None:
        model, _ = _builtin()
    ids = QuestionEncoder().encode(question)
    x = image[None].float() if isinstance(image, Tensor) else images(image)
    if isinstance(target, str):
        if target not in ANSWERS:
            raise TargetError(f"unknown answer {target!r}; answers: {', '.join(ANSWERS)}")
        target = ANSWERS.index(target)
    res = explain(model, (x, ids), target=target, composite=composite)
    logits = res.output  # the model ends in its logits
    probs = torch.softmax(logits[0], 0)
    predicted = int(probs.argmax())
    explained = int(res.target[0]) if res.target is not None else predicted
    r_image, r_words = res.relevance
    return Answer(ANSWERS[predicted], float(probs[predicted]), ANSWERS[explained], tokenize(question),
                  r_image[0].sum(0), r_words[0], float(logits[0, explained]), probs.tolist())


_BUILTIN: dict[str, Any] = {}


def _builtin() -> tuple[VQANet, QuestionEncoder]:
    if "model" not in _BUILTIN:
        _BUILTIN["model"] = vqa()
    return _BUILTIN["model"]
