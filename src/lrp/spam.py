"""The built-in spam classifier: a small text CNN trained by this project on the SpamAssassin public corpus.

``lrp.models.spam()`` returns ``(model, tokenizer)``: :class:`SpamNet` in eval mode, which maps token ids
``(batch, seq)`` (long, right-padded with :data:`SPAM_PAD_ID`) to logits ``(batch, 2)`` for
:data:`SPAM_CLASSES` ``("ham", "spam")``, and its byte-level BPE ``tokenizers.Tokenizer``. :func:`encode` turns
a text or a raw e-mail into ids, token strings and character spans; :func:`encode_batch` pads several.

What the model reads (:func:`lrp.mail.mail_text`): the subject and the plain-text body (HTML parts as the
text they show), nothing else of the headers, without mailing-list tags and footers and with the corpus
collectors' own addresses neutralised -- these give away which folder of the corpus a mail came from. At most
:data:`SPAM_MAX_TOKENS` tokens are read: the subject and the start of the body.

Held-out split (:func:`heldout_key`): a mail is held out when the SHA-256 of the first 200 letters (a-z,
lower-cased) of its parsed body, read as an integer, is divisible by 5. Mails with the same start (one spam
campaign sent many times, a message and its copy) therefore fall on the same side. 1,190 of the 6,046 mails are
held out; they ship, as the text the model reads, in ``data/spam_heldout.jsonl.gz`` (:func:`spam_heldout`), 20
of them as demo examples (:func:`spam_examples`). ``python scripts/train_spam.py`` reproduces the tokenizer and
the checkpoint (fixed seed) from the corpus; see ``data/SPAM-README.md`` for provenance and licence.

The network is LRP-friendly: embedding -> Conv1d (width 5) -> ReLU -> max over positions -> linear, no biases,
so relevance is conserved (the tokens' relevance sums to the explained logit, up to the rules' stabilisers).
Padding is masked (its embedding and the convolution's outputs over it are zeroed), so a padded batch gives
each text the logits and relevance it gets alone, and padding gets no relevance. The two class rows of the
output layer are opposite (``w_ham = -w_spam``; the softmax is that of the trained model): explaining "ham"
gives exactly minus the relevance of explaining "spam".
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from functools import lru_cache
from importlib import resources
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn

from .mail import as_text
from .tokenized import Encoded, words_from_offsets

SPAM_CLASSES = ("ham", "spam")  # class 0, class 1
SPAM_MAX_TOKENS = 512  # tokens read per mail (subject first, then the body); the rest is cut off
SPAM_PAD_ID = 0  # the id of "<pad>"
SPAM_PAD = "<pad>"
SPAM_CHECKPOINT = "spam_cnn.pt"
SPAM_TOKENIZER = "spam_tokenizer.json"
SPAM_HELDOUT = "spam_heldout.jsonl.gz"
SPAM_EXAMPLES = "spam_examples.json"
SPAM_ACCURACY = 1171 / 1190  # held-out accuracy of the shipped checkpoint (0.9840; scripts/train_spam.py prints it)
SPAM_HELDOUT_SIZE = 1190  # mails in the held-out split

Tensor = torch.Tensor


class SpamNet(nn.Module):
    """Token ids ``(batch, seq)`` -> logits ``(batch, 2)`` (ham, spam): embeddings, one convolution over 5-token
    windows with ReLU, the maximum of each filter over the text, a linear layer. No biases; padding masked."""

    def __init__(self, vocab_size: int = 8000, dim: int = 64, channels: int = 128, width: int = 5,
                 pad_id: int = SPAM_PAD_ID, dropout: float = 0.5):
        super().__init__()
        if width % 2 != 1:
            raise ValueError(f"width must be odd (a window centred on each token), got {width}")
        self.pad_id = pad_id
        self.config = {"vocab_size": vocab_size, "dim": dim, "channels": channels, "width": width, "pad_id": pad_id}
        self.classes = SPAM_CLASSES
        self.accuracy: Optional[float] = None  # held-out accuracy, set by the loader
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.conv = nn.Conv1d(dim, channels, width, padding=width // 2, bias=False)
        self.relu = nn.ReLU()
        self.embedding_dropout = nn.Dropout(0.1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels, len(SPAM_CLASSES), bias=False)

    def features(self, ids: Tensor) -> Tensor:
        """``(batch, channels)``: each filter's largest response over the text's windows (>= 0)."""
        mask = (ids != self.pad_id).unsqueeze(1)  # (batch, 1, seq)
        x = self.embedding(ids).transpose(1, 2) * mask  # (batch, dim, seq)
        h = self.relu(self.conv(self.embedding_dropout(x))) * mask
        return h.amax(dim=2)

    def forward(self, ids: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.features(ids)))


# ----------------------------------------------------------------------------- shipped files

def _data_path(name: str) -> Any:
    return resources.files("lrp").joinpath("data", name)


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as exc:  # pragma: no cover - tokenizers comes with transformers
        raise ImportError("the spam model's tokenizer needs the 'tokenizers' package: pip install tokenizers") \
            from exc
    return tokenizers


def spam_tokenizer() -> Any:
    """The model's byte-level BPE tokenizer (a ``tokenizers.Tokenizer``; 8,000 tokens, id 0 = ``<pad>``),
    truncating to :data:`SPAM_MAX_TOKENS` and padding batches on the right."""
    tokenizers = _tokenizers()
    tok = tokenizers.Tokenizer.from_str(_data_path(SPAM_TOKENIZER).read_text(encoding="utf-8"))
    tok.enable_truncation(SPAM_MAX_TOKENS)
    tok.enable_padding(direction="right", pad_id=SPAM_PAD_ID, pad_token=SPAM_PAD)
    return tok


def spam(pretrained: bool = True) -> tuple[SpamNet, Any]:
    """``(model, tokenizer)``: the built-in spam classifier in eval mode and its tokenizer (see the module
    docstring); ``model.accuracy`` is its held-out accuracy. ``pretrained=False``: random weights (for sanity
    checks), the same tokenizer."""
    tok = spam_tokenizer()
    if not pretrained:
        return SpamNet(vocab_size=tok.get_vocab_size()).eval(), tok
    with _data_path(SPAM_CHECKPOINT).open("rb") as f:
        ckpt = torch.load(f, map_location="cpu", weights_only=True)
    model = SpamNet(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    model.accuracy = float(ckpt["accuracy"])
    return model.eval(), tok


class SpamMail(NamedTuple):
    """A mail of the corpus as the model reads it: ``id`` (the corpus's, unique within its folder), ``label``
    (0 ham, 1 spam), ``text``, and the corpus folder (``group``: easy-ham-1, easy-ham-2, hard-ham-1, spam-1,
    spam-2)."""

    id: str
    label: int
    text: str
    group: str = ""

    @property
    def label_name(self) -> str:
        return SPAM_CLASSES[self.label]


def _read_mails(name: str) -> list[SpamMail]:
    with _data_path(name).open("rb") as f:
        data = gzip.decompress(f.read()) if name.endswith(".gz") else f.read()
    text = data.decode("utf-8")
    rows = json.loads(text) if name.endswith(".json") else [json.loads(ln) for ln in text.split("\n") if ln.strip()]
    return [SpamMail(r["id"], SPAM_CLASSES.index(r["label"]), r["text"], r.get("group", "")) for r in rows]


def spam_heldout() -> list[SpamMail]:
    """The 1,190 held-out mails (see :func:`heldout_key`), as the text the model reads, in corpus order."""
    return _read_mails(SPAM_HELDOUT)


def spam_examples() -> list[SpamMail]:
    """20 held-out mails for demos, 10 ham and 10 spam (the first of each class in a seeded shuffle)."""
    return _read_mails(SPAM_EXAMPLES)


def heldout_key(text: str) -> str:
    """The split key of a parsed mail (``subject + "\\n\\n" + body``): the first 200 letters of its body, lower-
    cased, everything but a-z dropped."""
    body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
    return re.sub(r"[^a-z]", "", body.lower())[:200]


def is_heldout(text: str) -> bool:
    """Whether a parsed mail belongs to the held-out split: SHA-256 of :func:`heldout_key`, mod 5 == 0."""
    return int(hashlib.sha256(heldout_key(text).encode("utf-8")).hexdigest(), 16) % 5 == 0


# ----------------------------------------------------------------------------- text <-> ids

def _encoded(enc: Any, text: str) -> Encoded:
    n = sum(enc.attention_mask)
    spans: list[Optional[tuple[int, int]]] = [(int(a), int(b)) for a, b in enc.offsets[:n]]
    special = [False] * n  # the spam tokenizer adds no special tokens
    return Encoded(text, list(enc.ids[:n]), list(enc.tokens[:n]), special, words_from_offsets(text, spans, special),
                   spans, bool(enc.overflowing))


def encode(text: str, tokenizer: Any = None, *, mail: Optional[bool] = None) -> Encoded:
    """One text as the spam model reads it: an :class:`lrp.tokenized.Encoded` (``ids``, ``tokens``, ``words``,
    ``spans``, ``text``, ``truncated``; ``encoded.tensor()`` is the model's input ``(1, n)``).

    ``text``: plain text (read as it is) or a raw e-mail (parsed to subject and body by
    :func:`lrp.mail.mail_text`); ``mail=None`` decides by whether it starts with mail headers. ``tokenizer``:
    default :func:`spam_tokenizer`. At most :data:`SPAM_MAX_TOKENS` tokens."""
    tok = tokenizer if tokenizer is not None else spam_tokenizer()
    text = as_text(text, raw=mail)
    return _encoded(tok.encode(text), text)


def encode_batch(texts: Sequence[str], tokenizer: Any = None, *, mail: Optional[bool] = None
                 ) -> tuple[Tensor, list[Encoded]]:
    """Ids ``(batch, longest)`` right-padded with :data:`SPAM_PAD_ID`, and each text's :class:`Encoded`."""
    tok = tokenizer if tokenizer is not None else spam_tokenizer()
    texts = [as_text(t, raw=mail) for t in texts]
    encoded = [_encoded(e, t) for e, t in zip(tok.encode_batch(texts), texts)]
    return _pad([e.ids for e in encoded]), encoded


def _pad(rows: Sequence[Sequence[int]]) -> Tensor:
    n = max((len(r) for r in rows), default=0)
    return torch.tensor([list(r) + [SPAM_PAD_ID] * (n - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), n)


def token_strings(ids: Union[Tensor, Sequence[int]], tokenizer: Any = None, *, keep_padding: bool = False
                  ) -> list[str]:
    """The token strings of a row of ids (padding dropped unless ``keep_padding``)."""
    tok = tokenizer if tokenizer is not None else spam_tokenizer()
    values = ids.reshape(-1).tolist() if isinstance(ids, Tensor) else list(ids)
    return [tok.id_to_token(int(i)) for i in values if keep_padding or int(i) != SPAM_PAD_ID]


@torch.no_grad()
def spam_accuracy(model: Optional[nn.Module] = None, tokenizer: Any = None, mails: Optional[Sequence[SpamMail]] = None,
                  batch_size: int = 64) -> float:
    """Accuracy on the held-out split (or on ``mails``) of ``model`` (default: the built-in one)."""
    if model is None:
        model, tokenizer = spam()
    tok = tokenizer if tokenizer is not None else spam_tokenizer()
    mails = spam_heldout() if mails is None else list(mails)
    was_training = model.training
    model.eval()
    rows = [e.ids[:sum(e.attention_mask)] for e in tok.encode_batch([m.text for m in mails])]
    order = sorted(range(len(mails)), key=lambda k: len(rows[k]))  # little padding per batch
    correct = 0
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        pred = model(_pad([rows[k] for k in idx])).argmax(1)
        correct += int((pred == torch.tensor([mails[k].label for k in idx])).sum())
    model.train(was_training)
    return correct / max(len(mails), 1)


@lru_cache(maxsize=4)
def _pipeline(device: str) -> Any:
    from .pipeline.text import TextPipeline
    return TextPipeline.spam(device)


def explain_text(text: str, target: Union[None, int, str] = None, *, composite: Any = "epsilon",
                 mail: Optional[bool] = None, device: str = "cpu") -> Any:
    """Explain the built-in model's decision about ``text`` (a raw e-mail or plain text, see :func:`encode`) for
    the predicted class, or ``target`` (0/1 or ``"ham"``/``"spam"``): a
    :class:`~lrp.pipeline.text.TextOutcome` with a relevance per token (``relevance``, ``encoded.tokens``),
    ``words()`` (each word's relevance: its tokens' summed), ``predicted_label``, ``probability`` and ``html()``.
    Relevance for ham is exactly minus relevance for spam (:class:`SpamNet`'s opposite class rows)."""
    pipeline = _pipeline(str(device))
    return pipeline.explain(encode(text, pipeline.tokenizer, mail=mail), target, composite)
