"""Language models as one output to explain: the next token's logits, or a generated continuation.

``lrp.explain`` explains a model whose output is ``(batch, classes)`` or one score per sample. A causal language
model returns logits for every position; these wrappers pick what to explain:

>>> res = lrp.explain(lrp.language.NextToken(lm), ids)                         # doctest: +SKIP
>>> out = lm.generate(ids, max_new_tokens=8, do_sample=False)                  # doctest: +SKIP
>>> res = lrp.explain(lrp.language.Continuation(lm, ids.shape[1]), out)        # doctest: +SKIP

Both take token ids (relevance per token) or, as ``inputs_embeds``, float embeddings (relevance per element).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .errors import LRPError

Tensor = torch.Tensor


def logits_of(lm: nn.Module, x: Tensor) -> Tensor:
    """All positions' logits ``(batch, positions, vocabulary)`` of ``lm`` for token ids or float embeddings.

    A Hugging Face model is called with ``input_ids=`` (``inputs_embeds=`` for a float ``x``) and no cache; any
    other module with ``x`` alone."""
    if hasattr(lm, "config") and hasattr(lm, "generate"):
        key = "inputs_embeds" if x.is_floating_point() else "input_ids"
        out = lm(**{key: x, "use_cache": False})
    else:
        out = lm(x)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        raise LRPError(f"a language model must return logits shaped (batch, positions, vocabulary); this one "
                       f"returns {type(out).__name__}"
                       f"{' shaped ' + str(tuple(logits.shape)) if isinstance(logits, Tensor) else ''}")
    return logits


class NextToken(nn.Module):
    """The next-token logits ``(batch, vocabulary)`` at ``position`` (default: after the last token).

    ``lrp.explain(NextToken(lm), ids)`` explains the predicted next token; ``target=`` names another one."""

    def __init__(self, lm: nn.Module, position: int = -1):
        super().__init__()
        self.lm = lm
        self.position = position

    def forward(self, x: Tensor) -> Tensor:
        return logits_of(self.lm, x)[:, self.position]


class Continuation(nn.Module):
    """How strongly the model predicts a continuation of its prompt, one score per sample.

    ``sequences`` hold the prompt (its first ``prompt_length`` tokens) and the continuation after it, as
    ``lm.generate`` returns them. The continuation's log-likelihood is ``sum_t log p(y_t) = sum_t (z_t - lse_t)``,
    with ``z_t`` the logit of token ``y_t`` given the tokens before it and ``lse_t`` the log-sum-exp of that
    position's logits. LRP holds the normaliser ``lse_t`` fixed, as it holds softmax denominators and normalisation
    statistics fixed; as a bias it takes its share and leaves each token's logit with exactly ``z_t``. So the score
    explained is ``sum_t z_t``, the generated tokens' logits, and every token (prompt and continuation) gets the
    relevance it has for the tokens after it. (Starting from ``log p`` itself, which is negative, would flip the
    sign of every map.) Positions holding ``pad_token_id`` (after the end of a shorter sequence) are left out.
    With float embeddings as input (``inputs_embeds``), pass the continuation's ids as ``tokens``.
    """

    def __init__(self, lm: nn.Module, prompt_length: int, pad_token_id: Optional[int] = None,
                 tokens: Optional[Tensor] = None):
        super().__init__()
        if prompt_length < 1:
            raise LRPError(f"prompt_length must be at least 1 (the first generated token is predicted from the "
                           f"prompt); got {prompt_length}")
        self.lm = lm
        self.prompt_length = prompt_length
        self.pad_token_id = pad_token_id
        self.tokens = tokens

    def _tokens(self, sequences: Tensor) -> tuple[Tensor, Tensor]:
        """The continuation's token ids and a mask of those that count."""
        n = sequences.shape[1]
        if n <= self.prompt_length:
            raise LRPError(f"the sequences hold {n} tokens, no more than the prompt's {self.prompt_length}: there is "
                           f"no continuation to explain (pass the output of lm.generate, prompt and continuation)")
        tokens = self.tokens
        if tokens is None:
            if sequences.is_floating_point():
                raise LRPError("with embeddings as input, Continuation needs the continuation's token ids: "
                               "Continuation(lm, prompt_length, tokens=ids[:, prompt_length:])")
            tokens = sequences[:, self.prompt_length:]
        elif tokens.shape != (sequences.shape[0], n - self.prompt_length):
            raise LRPError(f"tokens has shape {tuple(tokens.shape)}; it must hold the continuation's ids, shaped "
                           f"{(sequences.shape[0], n - self.prompt_length)}")
        if self.pad_token_id is not None and not sequences.is_floating_point() and bool(
                (sequences[:, :self.prompt_length] == self.pad_token_id).any()):
            raise LRPError("the prompts hold padding (pad_token_id): lrp runs the model without an attention mask, "
                           "so left-padded prompts would be explained as other texts; explain each prompt and its "
                           "continuation on its own, without padding")
        keep = torch.ones_like(tokens, dtype=torch.bool) if self.pad_token_id is None \
            else tokens != self.pad_token_id
        return tokens, keep

    def forward(self, sequences: Tensor) -> Tensor:
        """``sum_t z_t`` per sample (see the class docstring)."""
        tokens, keep = self._tokens(sequences)
        logits = logits_of(self.lm, sequences)[:, self.prompt_length - 1:-1]
        picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return (picked * keep).sum(-1)

    @torch.no_grad()
    def log_probabilities(self, sequences: Tensor) -> Tensor:
        """``log p(y_t)`` of each continuation token ``(batch, tokens)``, 0 where left out (padding)."""
        tokens, keep = self._tokens(sequences)
        logits = logits_of(self.lm, sequences)[:, self.prompt_length - 1:-1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        logp = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return logp * keep
