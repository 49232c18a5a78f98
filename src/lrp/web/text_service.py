"""The web demo's text models: load and warm up a text classifier, check a text, explain it, list examples.

Synchronous, like :mod:`lrp.web.service`: runs in a worker thread and raises
:class:`~lrp.web.service.ServiceError` with the HTTP status to answer.
"""

from __future__ import annotations

import threading
import time
from functools import lru_cache
from typing import Optional, Union

import torch

from ..composites import COMPOSITES
from ..errors import InputError, LRPError, ModelError, TargetError, one_line
from ..pipeline.text import SPAM_SPEC, TextOutcome, TextPipeline, text_composite
from .schemas import MAX_TEXT_CHARS, TEXT_COMPOSITE, ExplainTextRequest, ExplainTextResponse, TextExample, TextWord
from .service import ServedModel, ServiceError

DEFAULT_MODELS = ("mnist", "spam", "vqa")  # what lrp serve serves without --model
WARM_UP_TEXT = "lrp warms up"  # short: it fits any model


def text_composites() -> list[str]:
    """The composites a text model can be explained with (not those that need the input's value range)."""
    names = []
    for name in COMPOSITES:
        try:
            text_composite(name)
        except ModelError:
            continue
        names.append(name)
    return names


class ServedText:
    """A text classifier (:class:`~lrp.pipeline.text.TextPipeline`) as ``lrp serve`` serves it: warmed up,
    explained one request at a time."""

    modality = "text"
    drawable = False

    def __init__(self, pipeline: TextPipeline, name: Optional[str] = None) -> None:
        if pipeline.kind != "classifier":
            raise ModelError(f"lrp serve explains text classifiers; {pipeline.name} is a causal language model. "
                             f"Explain it at its next token with lrp explain --model {pipeline.name} --text \"...\"")
        self.pipeline = pipeline
        self.name = name or pipeline.name
        self.composites = text_composites()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, spec: str, classes: Optional[str] = None, device: Union[str, torch.device] = "cpu") -> "ServedText":
        """``spam`` or ``hf:DIR`` (a text classifier); raises ``ModelError`` (a causal language model too)."""
        return cls(TextPipeline.load(spec, device=device, classes=classes))

    @property
    def model(self) -> torch.nn.Module:
        return self.pipeline.model

    @property
    def classes(self) -> list[str]:
        return list(self.pipeline.labels or [str(k) for k in range(self.pipeline.outputs)])

    @property
    def kind(self) -> str:
        return "spam" if self.pipeline.name == SPAM_SPEC else "huggingface"

    def warm_up(self) -> None:
        """Explain a short text twice, so that the first request is as fast as the others."""
        try:
            for _ in range(2):
                self.pipeline.explain(WARM_UP_TEXT, composite=TEXT_COMPOSITE, progress=False)
        except (ModelError, InputError):
            raise
        except Exception as exc:
            raise ModelError(f"model {self.name!r} fails on a short text: {one_line(exc)}") from None

    def examples(self) -> list[TextExample]:
        """Held-out example texts: the spam model's 20 mails; none for other models."""
        return list(_spam_examples()) if self.pipeline.name == SPAM_SPEC else []

    def explain(self, request: ExplainTextRequest) -> ExplainTextResponse:
        """Check the text and the options, explain, and answer as ``POST /api/explain`` does."""
        started = time.perf_counter()
        text = request.text
        if len(text) > MAX_TEXT_CHARS:
            raise ServiceError(413, f"text: {len(text):,} characters is too long: at most {MAX_TEXT_CHARS:,}; "
                                    f"send a shorter text (the start of it: {self.name} reads its first "
                                    f"{self.pipeline.max_tokens or 'few hundred'} tokens)")
        if not text.strip():
            raise ServiceError(422, "text: " + ("only white space" if text else "empty") +
                                    "; send the text to explain in it, e.g. {\"text\": \"Win a free prize now!\"}")
        name = request.composite.lower().replace("_", "-")
        if name not in self.composites:
            known = f"unknown composite {request.composite!r}" if name not in COMPOSITES else \
                f"composite {name!r} needs the input's value range, and token ids have none"
            raise ServiceError(422, f"{known}; for text choose one of {', '.join(self.composites)}")
        pipeline = self.pipeline
        with self._lock:  # one text at a time per model (the model and its explainers are shared)
            try:
                target = pipeline.target(request.target)
                encoded = pipeline.encode(text)
                n, limit = len(encoded), pipeline.max_tokens
                if n == 0:
                    raise ServiceError(422, "text: the tokenizer gives no tokens for it; send some words")
                if limit is not None and n > limit and not pipeline.truncates:
                    raise ServiceError(413, f"text: {n} tokens, but {self.name} reads at most {limit}; shorten "
                                            f"the text or split it")
                outcome = pipeline.explain(encoded, target, name, progress=False)  # no bars in the server log
            except TargetError as exc:
                raise ServiceError(400, str(exc)) from None
            except InputError as exc:
                raise ServiceError(422, str(exc)) from None
            except (ModelError, LRPError) as exc:
                raise ServiceError(422, f"model {self.name!r} cannot be explained: {exc}") from None
            except ServiceError:
                raise
            except Exception as exc:
                raise ServiceError(422, f"model {self.name!r} failed on this text: {one_line(exc)}") from None
        return _response(self, outcome, request, started)


def _response(served: ServedText, outcome: TextOutcome, request: ExplainTextRequest,
              started: float) -> ExplainTextResponse:
    e = outcome.encoded
    probabilities = outcome.probabilities or []
    predicted = outcome.predicted if outcome.predicted is not None else outcome.target
    words = [TextWord(word=w, relevance=r, tokens=positions) for w, r, positions in outcome.words()] \
        if request.words else None
    return ExplainTextResponse(
        model=served.name, composite=outcome.composite, prediction=predicted, prediction_label=outcome.predicted_label,
        probabilities=probabilities, target=outcome.target, target_label=outcome.explained,
        opposite_label=outcome.opposite, score=outcome.score, relevance_sum=outcome.relevance_sum, text=e.text,
        tokens=list(e.tokens), relevance=outcome.relevance.tolist(),
        spans=[None if span is None or e.special[k] else (int(span[0]), int(span[1]))
               for k, span in enumerate(e.spans)],
        special=list(e.special), words=words, truncated=e.truncated, max_tokens=served.pipeline.max_tokens,
        html=outcome.token_html(merge=request.words) if request.html else None,
        elapsed_ms=round((time.perf_counter() - started) * 1000, 3))


@lru_cache(maxsize=1)
def _spam_examples() -> tuple[TextExample, ...]:
    from ..spam import spam_examples

    return tuple(TextExample(id=m.id, label=m.label, label_name=m.label_name, subject=m.text.split("\n", 1)[0],
                             text=m.text, group=m.group) for m in spam_examples())


Served = Union[ServedModel, ServedText]  # a model lrp serve serves
