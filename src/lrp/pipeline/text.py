"""Text models: tokenize a text, explain one relevance per token, and write a token heatmap (``.html``) and a
table (``.csv``).

Two kinds of model spec:

- ``spam``: the built-in spam classifier (:mod:`lrp.spam`): it reads plain text or a raw e-mail (subject and
  body), at most its first 512 tokens;
- ``hf:DIR``: a local Hugging Face checkpoint folder, saved with ``model.save_pretrained(DIR)`` and
  ``tokenizer.save_pretrained(DIR)`` and read with ``local_files_only=True``: nothing is downloaded. The model
  class comes from ``config.architectures``: a ``...ForSequenceClassification`` is explained at a class logit, a
  ``...ForCausalLM`` (``...LMHeadModel``) at the logit of a next token after the text's last position.
"""

from __future__ import annotations

import csv
import html
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO, Union

import torch

from ..composites import COMPOSITES, Composite, composite
from ..errors import InputError, ModelError, TargetError
from ..explain import Explainer
from ..language import NextToken
from ..tokenized import Encoded, words_from_offsets
from ..visualize import COLORMAPS, _token_units, token_html, token_words
from .models import check_device, read_classes
from .pipeline import needs_bounds, parse_target

HF_PREFIX = "hf:"
HF_SPEC = "'hf:DIR' (a local Hugging Face checkpoint folder with its tokenizer; with --text)"
SPAM_SPEC = "spam"  # the built-in spam classifier
TEXT_SPECS = "spam (the built-in spam classifier: .txt and .eml files, folders, --text)"
TEXT_COMPOSITE = "epsilon"  # the default composite for text: epsilon everywhere, AttnLRP in the attention
MAX_EXPLAINERS = 8  # composites whose Explainer a pipeline keeps
CMAP_ENDS = {"bwr": ("red", "blue"), "seismic": ("red", "blue"), "coldnhot": ("yellow", "cyan"),
             "gray": ("white", "black")}  # the colours of positive and negative relevance
LONG_INPUT = 512  # tokens: from this length one text gets a progress bar of its own (layer by layer)
CSV_FIELDS = ("position", "token_id", "token", "text", "word", "special", "relevance")
SUMMARY_FIELDS = ("input", "status", "predicted", "probability", "explained", "score", "relevance_sum", "tokens",
                  "truncated", "outputs", "text")
KINDS = {"classifier": "a text classifier", "causal-lm": "a causal language model (explained at the next token)"}


def is_hf_spec(spec: Optional[str]) -> bool:
    """Whether a model spec names a Hugging Face checkpoint folder (``hf:DIR``)."""
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def is_text_spec(spec: Optional[str]) -> bool:
    """Whether a model spec names a text model: ``spam`` or ``hf:DIR``."""
    return spec == SPAM_SPEC or is_hf_spec(spec)


def text_composite(name: Optional[str] = None) -> Composite:
    """The named composite for token ids (default ``epsilon``). Composites that put z^B on the input's value
    range are refused: token ids have none (``layered`` without bounds is fine: its w^2 goes to pixels only)."""
    key = (name or TEXT_COMPOSITE).lower().replace("_", "-")
    if key not in COMPOSITES:
        raise ModelError(f"unknown composite {name!r}; choose one of {', '.join(COMPOSITES)}")
    if needs_bounds(key) and key != "layered":
        raise ModelError(f"composite {key!r} applies z^B to the input's value range, and token ids have none; "
                         f"for text use epsilon (the default), lrp0, epsilon-plus or layered")
    return composite(key)


# --------------------------------------------------------------------------- the model

class TextModel(torch.nn.Module):
    """A Hugging Face model read as ``ids -> scores``: a classifier's class logits ``(batch, classes)``, or a
    causal language model's logits for the token after the last position ``(batch, vocabulary)``."""

    def __init__(self, model: torch.nn.Module, kind: str):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.model: Any = model  # a transformers PreTrainedModel
        self.kind = kind
        self.next_token = None if kind == "classifier" else NextToken(model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # one text, no padding: every token is attended to (no mask needed)
        if self.next_token is None:
            return self.model(input_ids=ids).logits
        return self.next_token(ids)


def _folder(spec: str) -> Path:
    return Path(spec[len(HF_PREFIX):] if is_hf_spec(spec) else spec).expanduser()


def _kind(architectures: Sequence[str], folder: Path) -> str:
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "classifier"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
    named = ", ".join(architectures) or "none (config.architectures is empty)"
    masked = any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in architectures)
    what = "a masked language model, which lrp does not explain yet" if masked else "not a kind lrp explains"
    raise ModelError(f"the model in {folder} is {named}: {what}. lrp explains text classifiers "
                     f"(...ForSequenceClassification) and causal language models (...ForCausalLM): save one of "
                     f"those with save_pretrained (e.g. a fine-tuned AutoModelForSequenceClassification)")


def load_checkpoint(spec: str) -> tuple[Any, Any, str]:
    """``(model in eval mode, tokenizer, kind)`` from a checkpoint folder (``hf:DIR`` or ``DIR``), read with
    ``local_files_only=True``. Raises :class:`~lrp.errors.ModelError` naming the problem and the way out."""
    folder = _folder(spec)
    shown = f"{HF_PREFIX}{folder}"
    if not (spec[len(HF_PREFIX):] if is_hf_spec(spec) else spec).strip():
        raise ModelError("hf: needs a folder: --model hf:DIR, with DIR a Hugging Face checkpoint folder saved with "
                         "model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR)")
    if not folder.is_dir():
        raise ModelError(f"model {shown}: no folder {folder}. Give a local Hugging Face checkpoint folder (saved "
                         f"with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR)); lrp downloads "
                         f"nothing: fetch a hub model yourself first, e.g. huggingface-cli download NAME "
                         f"--local-dir DIR")
    if not (folder / "config.json").is_file():
        raise ModelError(f"model {shown}: {folder} has no config.json, so it is not a Hugging Face checkpoint "
                         f"folder; save the model into it with model.save_pretrained({str(folder)!r})")
    try:
        import transformers
    except ImportError:
        raise ModelError("hf: models need the transformers library: pip install transformers") from None
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"model {shown}: cannot read {folder / 'config.json'}: {_first_line(exc)}") from None
    kind = _kind(list(getattr(config, "architectures", None) or []), folder)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):  # transformers 5 would make an empty one
        raise ModelError(f"model {shown}: {folder} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save "
                         f"the model's tokenizer next to it with tokenizer.save_pretrained({str(folder)!r})")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        reason = "" if isinstance(exc, OSError) else f" ({_first_line(exc)})"
        raise ModelError(f"model {shown}: {folder} holds no tokenizer that loads{reason}; save the model's tokenizer "
                         f"next to it with tokenizer.save_pretrained({str(folder)!r})") from None
    if not callable(tokenizer):
        raise ModelError(f"model {shown}: {folder} holds no tokenizer; save the model's tokenizer next to it with "
                         f"tokenizer.save_pretrained({str(folder)!r})")
    auto = (transformers.AutoModelForSequenceClassification if kind == "classifier"
            else transformers.AutoModelForCausalLM)
    logging = transformers.utils.logging
    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # transformers 5 draws a "Loading weights" bar on stderr
    try:
        model = auto.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"model {shown}: cannot load the model in {folder}: {_first_line(exc)}") from None
    finally:
        if bar:
            logging.enable_progress_bar()
    return model.eval(), tokenizer, kind


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


def _max_positions(config: Any) -> Optional[int]:
    """The longest input a Hugging Face model reads (its position embeddings), if its config says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- texts as tokens

def encode(tokenizer: Any, text: str) -> Encoded:
    """``text`` through ``tokenizer`` with its special tokens (``<s>``, ``[CLS]``...), as :class:`Encoded`."""
    spans: list[Optional[tuple[int, int]]]
    try:
        enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True, verbose=False)
        spans = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    except NotImplementedError:  # a slow (Python) tokenizer: no offsets
        enc = tokenizer(text, return_special_tokens_mask=True, verbose=False)
        spans = [None] * len(enc["input_ids"])
    ids = [int(i) for i in enc["input_ids"]]
    special = [bool(s) for s in enc.get("special_tokens_mask", [0] * len(ids))]
    tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    if any(span is not None for span in spans):
        words = words_from_offsets(text, spans, special)
    else:
        words = token_words(tokens, special=special)
    return Encoded(text, ids, tokens, special, words, spans)


# --------------------------------------------------------------------------- explaining

@dataclass
class TextOutcome:
    """The explanation of one text: one relevance per token."""

    source: str  # where the text came from: "text", "text[2]", "reviews.txt:3"
    encoded: Encoded
    relevance: torch.Tensor  # (tokens,), on the CPU
    target: int  # the explained class, or the explained next token's id
    explained: str  # its name: a class label, or the token as text
    score: float  # the logit the relevance started from
    predicted: Optional[int]
    predicted_label: str
    probability: Optional[float]  # of the predicted class / next token
    kind: str  # "classifier" or "causal-lm"
    model: str = ""
    composite: str = ""
    probabilities: Optional[list[float]] = None  # of every class (classifiers)
    opposite: Optional[str] = None  # the class whose relevance is exactly minus this one (the spam model's other)

    @property
    def relevance_sum(self) -> float:
        return float(self.relevance.sum())

    def words(self) -> list[tuple[str, float, list[int]]]:
        """``(word, relevance, token positions)`` per word of the text, in order, with the relevance of its tokens
        summed (as ``--merge-words`` shows them). Special tokens and tokens of white space are in no word."""
        e = self.encoded
        units, _ = _token_units(e.tokens, self.relevance, merge=True, style="auto", special=e.special, words=e.words)
        found, start = [], 0
        for unit in units:
            positions = list(range(start, start + len(unit.pieces)))
            start += len(unit.pieces)
            if unit.word is not None and not unit.special:
                found.append((unit.text.strip(), unit.value, positions))
        return found

    def rows(self) -> list[dict]:
        """One row per token: position, id, the tokenizer's piece, its text, word index, special, relevance."""
        e = self.encoded
        return [{"position": k, "token_id": e.ids[k], "token": e.tokens[k], "text": e.piece(k),
                 "word": "" if e.words[k] is None else e.words[k], "special": int(e.special[k]),
                 "relevance": f"{float(r):.9g}"} for k, r in enumerate(self.relevance.tolist())]

    def token_html(self, merge: bool = False, cmap: str = "bwr") -> str:
        """The token heatmap alone (see :func:`lrp.token_html`)."""
        e = self.encoded
        return token_html(e.tokens, self.relevance, cmap, merge=merge, special=e.special, words=e.words)

    def html(self, merge: bool = False, cmap: str = "bwr") -> str:
        """A self-contained HTML page: what was explained, the token heatmap and its colour scale."""
        return _document(self, merge, cmap)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (its longest ``ModuleList``: the transformer layers)."""
    lists = [list(m) for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    return max(lists, key=len) if lists else []


class _LayerProgress:
    """A progress bar that moves as the forward pass leaves each transformer block and as the relevance passes
    back through it: 2 steps per block, each one work done (hooks on the blocks and their outputs)."""

    def __init__(self, model: torch.nn.Module, n_tokens: int, show: Optional[bool], file: Optional[TextIO],
                 position: int = 0):
        from tqdm import tqdm

        self.blocks = _blocks(model)
        self.handles: list = []
        self.seen = 0  # steps reported by the hooks (the work that was watched)
        disable = True if show is False or not self.blocks else (None if show is None else False)
        self.bar = tqdm(total=2 * len(self.blocks), desc=f"{n_tokens} tokens", unit="layer", disable=disable,
                        file=file or sys.stderr, position=position, leave=position == 0)

    def __enter__(self) -> "_LayerProgress":
        if not self.bar.disable:
            for block in self.blocks:
                self.handles.append(block.register_forward_hook(self._forward))
        return self

    def _forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.seen += 1
        self.bar.update(1)
        out = output[0] if isinstance(output, (tuple, list)) and output else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(self._backward)

    def _backward(self, grad: torch.Tensor) -> None:
        self.seen += 1
        self.bar.update(1)

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        if exc[0] is None and self.bar.n < self.bar.total:  # the explanation is done: so is the work
            self.bar.update(self.bar.total - self.bar.n)
        self.bar.close()


@dataclass
class TextPipeline:
    """A text model with its tokenizer: encodes texts and explains them. ``model`` maps token ids ``(1, n)`` to
    scores ``(1, outputs)``: a classifier's class logits, or a causal language model's next-token logits."""

    model: torch.nn.Module
    tokenizer: Any
    name: str = ""
    labels: Optional[list[str]] = None  # class names (classifiers)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    kind: str = "classifier"  # or "causal-lm"
    outputs: int = 0  # classes, or the vocabulary of a language model
    max_tokens: Optional[int] = None  # the longest input the model reads
    # (text, mail) -> tokens, mail: whether the text is a raw e-mail (None: decide); default: the Hugging Face
    # tokenizer's, which reads every text as it is
    reader: Optional[Callable[[str, Optional[bool]], Encoded]] = None
    truncates: bool = False  # longer texts are cut to max_tokens (the spam model), not refused
    opposite_classes: bool = False  # two classes with opposite logits: relevance for one is minus the other's
    default_target: Optional[str] = None  # what lrp explain explains without --target (None: the prediction)
    merge_words: bool = False  # whether lrp explain's pages show words (True) or tokens by default
    accuracy: Optional[float] = None  # held-out accuracy, where known (the built-in model)
    _explainers: list = field(default_factory=list, init=False, repr=False)

    @classmethod
    def load(cls, spec: str, *, device: Union[str, torch.device] = "cpu",
             classes: Optional[str] = None) -> "TextPipeline":
        """Load ``spam`` or ``hf:DIR`` (or ``DIR``) onto ``device``; ``classes``: a file of class names (one a
        line) instead of the checkpoint's ``id2label``. Raises :class:`~lrp.errors.ModelError`."""
        device = torch.device(check_device(str(device)))
        if spec == SPAM_SPEC:
            if classes:
                raise ModelError("--classes does not apply to the built-in spam model: its classes are ham and spam")
            return cls.spam(device)
        hf_model, tokenizer, kind = load_checkpoint(spec)
        config = hf_model.config
        labels = None
        if kind == "classifier":
            count = int(config.num_labels)
            id2label = getattr(config, "id2label", None) or {}
            labels = [str(id2label.get(k, id2label.get(str(k), k))) for k in range(count)]
            if classes:
                names = read_classes(classes)
                if len(names) != count:
                    raise ModelError(f"{len(names)} class names were given in {classes}, but the model in "
                                     f"{_folder(spec)} has {count} classes; give one name per class, in order")
                labels = names
        elif classes:
            raise ModelError("--classes names a classifier's outputs; a causal language model's are its tokens "
                             "(give --target as a token or a token id)")
        else:
            count = int(hf_model.get_output_embeddings().weight.shape[0])
        model = TextModel(hf_model, kind).to(device)
        name = spec if is_hf_spec(spec) else f"{HF_PREFIX}{spec}"
        return cls(model, tokenizer, name, labels, device, kind=kind, outputs=count,
                   max_tokens=_max_positions(config))

    @classmethod
    def spam(cls, device: Union[str, torch.device] = "cpu") -> "TextPipeline":
        """The built-in spam classifier (:func:`lrp.models.spam`): reads plain text or a raw e-mail (its subject
        and body), at most its first :data:`~lrp.spam.SPAM_MAX_TOKENS` tokens. Without a target it explains
        ``spam``: red words speak for spam, blue ones for ham (the two logits are opposite)."""
        from .. import spam as spam_model

        model, tokenizer = spam_model.spam()

        def read(text: str, mail: Optional[bool] = None) -> Encoded:
            return spam_model.encode(text, tokenizer, mail=mail)

        return cls(model.to(device), tokenizer, SPAM_SPEC, list(spam_model.SPAM_CLASSES), torch.device(device),
                   kind="classifier", outputs=len(spam_model.SPAM_CLASSES), max_tokens=spam_model.SPAM_MAX_TOKENS,
                   reader=read, truncates=True, opposite_classes=True, default_target="spam", merge_words=True,
                   accuracy=model.accuracy)

    @property
    def num_outputs(self) -> int:
        return self.outputs

    def encode(self, text: str, mail: Optional[bool] = None) -> Encoded:
        """``text`` as the model reads it. The spam model reads a raw e-mail as its subject and body (``mail``:
        whether ``text`` is one; ``None``: decided by its first lines); Hugging Face models read every text as it
        is. Raises :class:`~lrp.errors.InputError` for a string that is not valid Unicode."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(f"the text holds {exc.object[exc.start:exc.end]!r} at character {exc.start}, which is "
                             f"not a character (a lone surrogate); send valid Unicode text") from None
        return self.reader(text, mail) if self.reader is not None else encode(self.tokenizer, text)

    def token_text(self, token_id: int) -> str:
        """A vocabulary token as the text it stands for."""
        return str(self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False))

    def label(self, index: int) -> str:
        """A class's name (classifiers) or a token as text, quoted (language models)."""
        if self.kind == "classifier":
            return self.labels[index] if self.labels and 0 <= index < len(self.labels) else str(index)
        text = self.token_text(index)
        if "\ufffd" in text or not text:  # part of a character (byte-level pieces): the piece as in the vocabulary
            return str(self.tokenizer.convert_ids_to_tokens(index))
        return repr(text)

    def target(self, spec: Union[int, str, None]) -> Optional[int]:
        """``None``/``"pred"`` (the predicted class or next token), a class index or name (classifiers), or a
        token id or a token (language models: one piece, as text like ``" Paris"`` or as in the vocabulary like
        ``"ĠParis"``; an integer is read as a token id)."""
        if isinstance(spec, str) and spec.strip() in ("", "pred"):
            return None
        count = self.num_outputs
        if self.kind == "classifier":
            index = parse_target(spec, self.labels)
            if index is not None and not 0 <= index < count:
                raise TargetError(f"target {index} is out of range: {self.name} has {count} classes (0..{count - 1}"
                                  + (f": {', '.join(self.labels[:10])}" if self.labels else "") + ")")
            return index
        if spec is None:
            return None
        if isinstance(spec, bool):
            raise TargetError(f"target must be a token or a token id, got {spec!r}")
        text = str(spec)
        if isinstance(spec, int) or text.strip().lstrip("-").isdigit():
            index = int(text)
            if not 0 <= index < count:
                raise TargetError(f"token id {index} is out of range: {self.name} has {count} tokens "
                                  f"(0..{count - 1})")
            return index
        vocab = self.tokenizer.get_vocab()
        if text in vocab:
            return int(vocab[text])
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) == 1:
            return int(ids[0])
        pieces = ", ".join(repr(self.token_text(i)) for i in ids[:6])
        raise TargetError(f"target {text!r} is {len(ids)} tokens for this tokenizer ({pieces or 'none'}); a language "
                          f"model is explained at one next token: give one of them (e.g. --target "
                          f"{self.token_text(ids[0])!r}) or a token id" if ids else
                          f"target {text!r} gives no token; give a token or a token id")

    def _explainer(self, spec: Union[str, Composite, None]) -> Explainer:
        """One :class:`lrp.Explainer` per composite (by name, or the object given), kept between texts."""
        key = spec if isinstance(spec, Composite) else (spec or TEXT_COMPOSITE).lower().replace("_", "-")
        found = next((e for k, e in self._explainers if k is key or (isinstance(key, str) and k == key)), None)
        if found is None:
            found = Explainer(self.model, key if isinstance(key, Composite) else text_composite(key))
            self._explainers.append((key, found))
            del self._explainers[:-MAX_EXPLAINERS]  # a new Composite object per call must not pile up
        return found

    def explain(self, text: Union[str, Encoded], target: Union[int, str, None] = None,
                composite: Union[str, Composite, None] = None, *, source: str = "text",
                progress: Optional[bool] = None, file: Optional[TextIO] = None,
                position: int = 0) -> TextOutcome:
        """Explain one text: one relevance per token. ``composite`` defaults to ``epsilon``. ``progress``: a
        progress bar layer by layer (forward and back): ``None`` for texts of ``LONG_INPUT`` tokens or more
        when ``file`` (default stderr) is a terminal, ``True`` always, ``False`` never. Raises
        :class:`~lrp.errors.InputError` for a text the model cannot read (empty, too long)."""
        encoded = self.encode(text) if isinstance(text, str) else text
        n = len(encoded)
        if n == 0:
            raise InputError(f"{source}: the text gives no tokens")
        limit = self.max_tokens
        if limit is not None and n > limit and not self.truncates:
            raise InputError(f"{source}: {n} tokens, but {self.name} reads at most {limit} "
                             f"(its position embeddings); shorten the text or split it")
        index = self.target(target)
        explainer = self._explainer(composite)
        ids = torch.tensor([encoded.ids], dtype=torch.long, device=self.device)
        show = progress if progress is not None else (None if n >= LONG_INPUT else False)
        with _LayerProgress(self.model, n, show, file, position):
            res = explainer(ids, index)
        logits = res.logits.detach().float().cpu() if res.logits is not None else res.output.detach().cpu()
        probabilities = torch.softmax(logits[0], 0) if logits.ndim == 2 and logits.shape[1] > 1 else None
        predicted = int(logits[0].argmax()) if probabilities is not None else None
        explained = int(res.target[0]) if res.target is not None else 0
        return TextOutcome(
            source, encoded, res.relevance[0].detach().float().cpu(), explained, self.label(explained),
            float(res.start.detach().reshape(-1).sum()), predicted,
            self.label(predicted) if predicted is not None else "",
            float(probabilities[predicted]) if probabilities is not None and predicted is not None else None,
            self.kind, self.name, explainer.composite.name or "",
            probabilities.tolist() if probabilities is not None and self.kind == "classifier" else None,
            self.label(1 - explained) if self.opposite_classes and self.outputs == 2 else None)


# --------------------------------------------------------------------------- outputs

def read_texts(texts: Optional[Sequence[str]] = None, files: Optional[Sequence[str]] = None
               ) -> list[tuple[str, str, str]]:
    """``(source, text, stem)`` for each ``--text`` (sources ``text``, or ``text[1]``... for several) and each
    non-blank line of each ``--text-file`` (``reviews.txt:3``, line numbers from 1; ``-``: standard input).
    Raises :class:`~lrp.errors.InputError` for a file that cannot be read or holds no text."""
    found: list[tuple[str, str, str]] = []
    texts = list(texts or [])
    for k, text in enumerate(texts, 1):
        found.append(("text" if len(texts) == 1 else f"text[{k}]", text, "text" if len(texts) == 1 else f"text_{k}"))
    for name in files or []:
        try:
            content = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"--text-file {name}: no such file") from None
        except UnicodeDecodeError:
            raise InputError(f"--text-file {name}: not UTF-8 text") from None
        except OSError as exc:
            raise InputError(f"--text-file {name}: cannot read it ({exc.strerror})") from None
        lines = [(k, line) for k, line in enumerate(content.splitlines(), 1) if line.strip()]
        if not lines:
            raise InputError(f"--text-file {name} holds no text (one text per line)")
        stem = "stdin" if name == "-" else Path(name).stem
        found += [(f"{name}:{k}", line, f"{stem}_{k}") for k, line in lines]
    return found


TEXT_SUFFIXES = (".txt", ".eml")  # what a folder is searched for


@dataclass
class TextFile:
    """One input file read as one text (``text``), or why it cannot be (``error``)."""

    source: str
    text: str = ""
    error: Optional[str] = None
    parsed: bool = False  # an e-mail already parsed to subject and body (.eml): not to be parsed again


def expand_text_inputs(paths: Sequence[Union[str, Path]]) -> list[Path]:
    """Files as given (any name: a mail saved without a suffix too); folders recursively, their ``.txt`` and
    ``.eml`` files, sorted. Missing paths are kept (reported when read)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        else:
            files.append(p)
    return files


def read_text_file(path: Union[str, Path]) -> TextFile:
    """A file as one text: ``.eml`` as an e-mail (its subject and plain-text body, :func:`lrp.mail.mail_text`),
    anything else as UTF-8 text (a raw e-mail in it is parsed by the spam model when read). Files that are
    missing, binary, not UTF-8 or empty come back with ``error`` saying so."""
    path = Path(path)
    source = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return TextFile(source, error="no such file")
    except IsADirectoryError:
        return TextFile(source, error="a folder, not a file")
    except OSError as exc:
        return TextFile(source, error=f"cannot read it ({exc.strerror})")
    if b"\x00" in data:
        return TextFile(source, error="a binary file, not text (give .txt or .eml files)")
    if path.suffix.lower() == ".eml":
        from ..mail import mail_text

        try:
            text = mail_text(data)
        except Exception as exc:  # the email package is lenient; anything it still refuses
            return TextFile(source, error=f"not an e-mail that parses ({type(exc).__name__})")
        if not text.strip():
            return TextFile(source, error="an e-mail without text in its subject or body")
        return TextFile(source, text, parsed=True)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return TextFile(source, error="not UTF-8 text; save it as UTF-8 (or as .eml if it is an e-mail)")
    if not text.strip():
        return TextFile(source, error="empty: no text")
    return TextFile(source, text)


def write_csv(outcome: TextOutcome, path: Union[str, Path]) -> None:
    """One row per token (``CSV_FIELDS``)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_FIELDS))
        writer.writeheader()
        writer.writerows(outcome.rows())


def write(outcome: TextOutcome, folder: Union[str, Path], stem: str, *, merge: bool = False,
          cmap: str = "bwr") -> list[str]:
    """Write ``<stem>.html`` (the token heatmap page) and ``<stem>.csv`` (a row per token); their names."""
    folder = Path(folder)
    (folder / f"{stem}.html").write_text(outcome.html(merge=merge, cmap=cmap), encoding="utf-8")
    write_csv(outcome, folder / f"{stem}.csv")
    return [f"{stem}.html", f"{stem}.csv"]


def summary_row(outcome: TextOutcome, stem: str) -> dict:
    """The ``summary.csv`` row of an explained text."""
    p = outcome.probability
    return {"input": outcome.source, "status": "ok", "predicted": outcome.predicted_label,
            "probability": f"{p:.4f}" if p is not None else "", "explained": outcome.explained,
            "score": f"{outcome.score:.6g}", "relevance_sum": f"{outcome.relevance_sum:.6g}",
            "tokens": len(outcome.encoded), "truncated": int(outcome.encoded.truncated), "outputs": stem,
            "text": _excerpt(outcome.encoded.text)}


def failed_row(source: str, text: str, reason: str) -> dict:
    """The ``summary.csv`` row of a text that could not be explained."""
    return {**{key: "" for key in SUMMARY_FIELDS}, "input": source, "status": f"failed: {reason}",
            "text": _excerpt(text)}


def write_summary(path: Union[str, Path], rows: Sequence[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(SUMMARY_FIELDS))
        writer.writeheader()
        writer.writerows(rows)


def _excerpt(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "\u2026"


def _document(outcome: TextOutcome, merge: bool, cmap: str) -> str:
    e = outcome.encoded
    units, _ = _token_units(e.tokens, outcome.relevance, merge=merge, style="auto", special=e.special,
                            words=e.words)
    vmax = max((abs(u.value) for u in units), default=0.0)
    esc = html.escape
    if outcome.kind == "classifier":
        explained = f"class {esc(outcome.explained)} (output {outcome.target})"
        predicted = f"class {esc(outcome.predicted_label)}" if outcome.predicted is not None else "-"
    else:
        explained = f"next token {esc(outcome.explained)} (id {outcome.target})"
        predicted = f"next token {esc(outcome.predicted_label)}" if outcome.predicted is not None else "-"
    if outcome.probability is not None:
        predicted += f", probability {outcome.probability:.3f}"
    share = f" ({outcome.relevance_sum / outcome.score:.1%} of the score)" if outcome.score else ""
    rows = [("model", esc(outcome.model)), ("input", esc(outcome.source)), ("explained", explained),
            ("score", f"{outcome.score:.6g} (its logit)"), ("predicted", predicted),
            ("relevance", f"sum {outcome.relevance_sum:.6g}{share} over {len(e)} tokens"
                          + (", pieces merged into words" if merge else "")),
            ("composite", esc(outcome.composite))]
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    anchors = COLORMAPS.get(cmap, COLORMAPS["bwr"])
    gradient = ", ".join(f"rgb{tuple(c)}" for c in anchors)
    title = f"lrp: why {outcome.explained}? ({_excerpt(e.text, 60)})"
    notes = (f"Hover over a {'word' if merge else 'token'} to see its relevance and "
             f"{'its pieces' if merge else 'the piece in the vocabulary'}.")
    if any(u.special for u in units):
        notes += " Framed: special tokens the tokenizer adds."
    if any(not u.special and not u.text.strip() for u in units):
        notes += " \u2423 and \u21b5 are tokens of spaces and line breaks."
    if e.truncated:
        notes += f" The model reads the first {len(e)} tokens: the rest of the text was cut off."
    high, low = CMAP_ENDS.get(cmap, ("right end", "left end"))
    if cmap == "wred":
        legend = f"red: for {outcome.explained} (this colour map does not show negative relevance)"
    elif outcome.opposite:
        legend = f"{high}: for {outcome.explained}, {low}: for {outcome.opposite}"
    else:
        legend = f"{high}: for the {'class' if outcome.kind == 'classifier' else 'token'}, {low}: against"
    after = ""
    if outcome.kind == "causal-lm":
        after = (f'<p class="next">&hellip; and the model is asked for the next token: '
                 f'<code>{esc(outcome.explained)}</code></p>')
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; color: #222; }}
table.meta th {{ text-align: left; font-weight: normal; color: #666; padding: 1px 1em 1px 0; vertical-align: top; }}
.legend {{ display: flex; align-items: center; gap: 0.5em; font-size: 0.85em; color: #555; margin: 1em 0; }}
.legend .bar {{ width: 12em; height: 0.8em; border: 1px solid #999;
                background: linear-gradient(to right, {gradient}); }}
.lrp-tokens {{ font-size: 1.1em; padding: 0.8em; border: 1px solid #ddd; border-radius: 4px; }}
.note {{ font-size: 0.85em; color: #666; }}
</style>
</head>
<body>
<h1>Why {explained}?</h1>
<table class="meta">{table}</table>
<div class="legend"><span>{-vmax:.3g}</span><span class="bar"></span><span>+{vmax:.3g}</span>
<span>{esc(legend)}</span></div>
{token_html(e.tokens, outcome.relevance, cmap, merge=merge, special=e.special, words=e.words, vmax=vmax or None)}
{after}
<p class="note">{esc(notes)}</p>
</body>
</html>
"""
