"""Evaluating explanations of text models by token deletion, and baseline methods for token ids.

A text model here reads token ids ``(batch, seq)`` (long, right-padded with ``pad_id``) through an
``nn.Embedding`` and returns class scores ``(batch, classes)``; every method returns one relevance per token
``(batch, seq)`` for the explained class ``c`` (default: the prediction), with score ``S = f_c`` (its logit):

- LRP: ``lrp.explain(model, ids, target, composite)``: relevance starts at the embedding output and is summed
  over the embedding dimension. Composites that apply z^B at the input are refused (token ids have no value
  range; :func:`lrp.pipeline.text.text_composite`).
- ``gradient`` (saliency): ``||dS/de_t||_2`` over the embedding dimension of token ``t``'s embedding ``e_t``;
  **unsigned** (>= 0): it ranks tokens by sensitivity, not by the direction of their effect.
- ``gradient-x-input``: ``sum_d e_td * dS/de_td``; signed.
- ``integrated-gradients``: ``sum_d e_td * mean_k dS/de_td(a_k e)``, the path from the zero embedding (the pad
  embedding of a model such as :class:`lrp.spam.SpamNet`) to ``e``, ``a_k = (k + 1/2) / steps`` (midpoint
  rule); the tokens' sum approaches ``S(e) - S(0)`` (completeness) as ``steps`` grows.
- ``occlusion`` (leave one word out): ``S(ids) - S(ids with the word's tokens set to pad_id)``, shared equally by
  the word's tokens; words from :attr:`lrp.tokenized.Encoded.words` (``None``: white space, relevance 0), or each
  token its own word.
- ``random``: relevance drawn from ``N(0, 1)`` (seeded), the floor.

Token deletion (:func:`token_deletion_curve`), the text version of :mod:`lrp.evaluate.perturbation`: the ``n``
real (non-pad) tokens of a text are ranked by relevance, most relevant first (``"morf"``) or least relevant first
(``"lerf"``); after step ``k`` of ``steps`` the first ``round(k * n / steps)`` are removed, by ``"mask"``
(replaced by ``pad_id``: gone for a model that masks padding, the other tokens keep their positions) or
``"delete"`` (dropped and the gap closed: the tokens after them move left, padding fills the end). With ``f_k``
the explained class's score after step ``k`` (its logit, or softmax probability), as for images:

    AOPC = 1 / (steps + 1) * sum_k (f_0 - f_k)      (MoRF: larger is better; LeRF: smaller is better)
    AUC  = integral of f over the fraction removed (trapezoids on k / steps in [0, 1])
    ABPC = AUC(LeRF) - AUC(MoRF)                     (larger is better)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ..baselines import target_scores
from ..composites import Composite
from ..engine import TargetSpec, class_targets, frozen, model_lock, model_output
from .perturbation import PerturbationCurve, Score, _score_fn

Tensor = torch.Tensor
Words = Optional[Sequence[Sequence[Optional[int]]]]  # per text, per token: its word index (None: white space)
TextMethod = Callable[..., Tensor]  # (model, ids, target, words) -> relevance (batch, seq)
TextMethodSpec = Union[str, Composite, Callable[..., object]]
REMOVALS = ("mask", "delete")
ORDERS = ("morf", "lerf")

# what the token-deletion report compares by default: the composites that give different maps on SpamNet
# (lrp0 = epsilon up to the 1e-6 stabiliser; epsilon-plus-flat = epsilon-plus, Flat being for pixels only),
# and the baselines for token ids
DEFAULT_TEXT_METHODS: dict[str, TextMethodSpec] = {
    "epsilon": "epsilon", "epsilon-plus": "epsilon-plus", "epsilon-alpha2-beta1": "epsilon-alpha2-beta1",
    "layered": "layered", "gradient": "gradient", "gradient-x-input": "gradient-x-input",
    "integrated-gradients": "integrated-gradients", "occlusion": "occlusion", "random": "random",
}


# --------------------------------------------------------------------------- embeddings and scores

def find_embedding(model: torch.nn.Module, embedding: Optional[torch.nn.Embedding] = None) -> torch.nn.Embedding:
    """``embedding`` if given, else the model's first ``nn.Embedding`` (``ValueError`` when it has none)."""
    if embedding is not None:
        return embedding
    found = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no nn.Embedding; pass embedding= (the module that turns the "
                         f"token ids into vectors)")
    return found


@contextlib.contextmanager
def _embeddings(embedding: torch.nn.Embedding, values: Tensor) -> Iterator[None]:
    """Within the block, the embedding layer returns ``values`` instead of looking the ids up."""
    def hook(module: torch.nn.Module, inputs: object, output: Tensor) -> Tensor:
        if tuple(output.shape) != tuple(values.shape):
            raise ValueError(f"the embedding's output has shape {tuple(output.shape)}, the values given "
                             f"{tuple(values.shape)}")
        return values
    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _targets(model: torch.nn.Module, ids: Tensor, target: TargetSpec) -> Tensor:
    with torch.no_grad():
        idx = class_targets(model_output(model(ids)), target)
    if idx is None:
        raise ValueError("token deletion needs a model with class scores (batch, classes)")
    return idx


def _embedding_gradients(model: torch.nn.Module, ids: Tensor, idx: Tensor, values: Tensor,
                         embedding: torch.nn.Embedding, repeat: int = 1) -> Tensor:
    """``dS/de`` at ``values``, which holds ``repeat`` stacked copies of the batch's embeddings."""
    leaf = values.detach().requires_grad_(True)
    with torch.enable_grad(), _embeddings(embedding, leaf):
        out = model_output(model(ids.repeat(repeat, 1)))
        (grad,) = torch.autograd.grad(target_scores(out, idx.repeat(repeat)).sum(), leaf)
    return grad


# --------------------------------------------------------------------------- baselines for token ids

def gradient(model: torch.nn.Module, ids: Tensor, target: TargetSpec = None, *,
             embedding: Optional[torch.nn.Embedding] = None) -> Tensor:
    """Saliency ``||dS/de_t||_2`` per token (unsigned)."""
    emb = find_embedding(model, embedding)
    with model_lock(model), frozen(model):
        with torch.no_grad():
            e = emb(ids)
        grad = _embedding_gradients(model, ids, _targets(model, ids, target), e, emb)
    return grad.norm(dim=-1)


def gradient_x_input(model: torch.nn.Module, ids: Tensor, target: TargetSpec = None, *,
                     embedding: Optional[torch.nn.Embedding] = None) -> Tensor:
    """``sum_d e_td * dS/de_td`` per token (signed)."""
    emb = find_embedding(model, embedding)
    with model_lock(model), frozen(model):
        with torch.no_grad():
            e = emb(ids)
        grad = _embedding_gradients(model, ids, _targets(model, ids, target), e, emb)
    return (grad * e).sum(-1)


def integrated_gradients(model: torch.nn.Module, ids: Tensor, target: TargetSpec = None, *, steps: int = 32,
                         batch_size: int = 8, embedding: Optional[torch.nn.Embedding] = None) -> Tensor:
    """``sum_d e_td * mean_k dS/de_td(a_k e)``, ``a_k = (k + 1/2) / steps``, from the zero embedding;
    ``batch_size`` points of the path per pass."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"integrated_gradients needs steps >= 1 and batch_size >= 1, got {steps}, {batch_size}")
    emb = find_embedding(model, embedding)
    with model_lock(model), frozen(model):
        with torch.no_grad():
            e = emb(ids)
        idx = _targets(model, ids, target)
        alphas = (torch.arange(steps, dtype=e.dtype, device=e.device) + 0.5) / steps
        total = torch.zeros_like(e)
        for chunk in alphas.split(batch_size):
            path = (chunk.view(-1, 1, 1, 1) * e).reshape(-1, *e.shape[1:])
            grad = _embedding_gradients(model, ids, idx, path, emb, repeat=len(chunk))
            total += grad.view(len(chunk), *e.shape).sum(0)
    return (e * total / steps).sum(-1)


def word_index(ids: Tensor, words: Words = None, pad_id: int = 0) -> Tensor:
    """``(N, seq)`` long: each token's word, numbered ``0, 1, ...`` per text in order of first appearance; ``-1``
    for padding and for tokens whose word is ``None`` (white space). ``words=None``: each token its own word."""
    real = ids != pad_id
    if words is None:
        return torch.where(real, real.long().cumsum(1) - 1, torch.full_like(ids, -1))
    index = torch.full(ids.shape, -1, dtype=torch.long)
    real = real.cpu()  # read token by token below: on a GPU each read would wait for the device
    for i, row in enumerate(words):
        numbers: dict[int, int] = {}
        for t, w in enumerate(list(row)[:ids.shape[1]]):
            if w is not None and bool(real[i, t]):
                index[i, t] = numbers.setdefault(w, len(numbers))
    return index.to(ids.device)


def occlusion(model: torch.nn.Module, ids: Tensor, target: TargetSpec = None, *, words: Words = None,
              pad_id: int = 0, batch_size: int = 256) -> Tensor:
    """Leave one word out: ``S(ids) - S(ids with the word's tokens = pad_id)``, shared equally by its tokens.
    ``words[i][t]``: the word index of token ``t`` of text ``i`` (``None``: relevance 0); default: each
    token its own word."""
    if batch_size < 1:
        raise ValueError(f"occlusion needs batch_size >= 1, got {batch_size}")
    index = word_index(ids, words, pad_id)
    count = int(index.max()) + 1 if index.numel() else 0
    sizes = torch.zeros(ids.shape[0], count + 1, device=ids.device).scatter_add_(
        1, index + 1, torch.ones(index.shape, device=ids.device))[:, 1:]  # tokens per word; column 0: no word
    pairs = sizes.nonzero()  # (text, word) for every word of every text
    drops = torch.zeros(ids.shape[0], count, dtype=torch.float32, device=ids.device)
    with model_lock(model), frozen(model), torch.no_grad():
        out = model_output(model(ids))
        idx = class_targets(out, target)
        if idx is None:
            raise ValueError("occlusion needs a model with class scores (batch, classes)")
        base = target_scores(out, idx).float()
        for chunk in pairs.split(batch_size):
            rows, w = chunk[:, 0], chunk[:, 1]
            occluded = torch.where(index[rows] == w[:, None], torch.full_like(ids[rows], pad_id), ids[rows])
            drops[rows, w] = base[rows] - target_scores(model_output(model(occluded)), idx[rows]).float()
    if count == 0:
        return torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    share = (drops / sizes.clamp_min(1)).gather(1, index.clamp_min(0))
    return torch.where(index >= 0, share, torch.zeros_like(share))


def random(model: torch.nn.Module, ids: Tensor, target: TargetSpec = None, *, seed: int = 0,
           pad_id: int = 0) -> Tensor:
    """Relevance drawn from ``N(0, 1)`` for each real token (0 for padding), independent of the model."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(ids.shape, generator=gen).to(ids.device)
    return torch.where(ids != pad_id, r, torch.zeros_like(r))


TEXT_BASELINES: dict[str, Callable[..., Tensor]] = {
    "gradient": gradient,
    "gradient-x-input": gradient_x_input,
    "integrated-gradients": integrated_gradients,
    "occlusion": occlusion,
    "random": random,
}


def lrp_relevance(model: torch.nn.Module, ids: Tensor, target: TargetSpec = None,
                  composite: Union[str, Composite] = "epsilon") -> Tensor:
    """``lrp.explain(model, ids, target, composite).relevance``: one relevance per token. A composite named
    must suit token ids (:func:`lrp.pipeline.text.text_composite` refuses those that need input bounds)."""
    from ..explain import explain
    from ..pipeline.text import text_composite
    comp = composite if isinstance(composite, Composite) else text_composite(composite)
    return explain(model, ids, target, comp).relevance.detach()


def resolve_text_method(spec: TextMethodSpec, *, pad_id: int = 0, seed: int = 0) -> TextMethod:
    """``(model, ids, target, words) -> relevance (batch, seq)`` for a baseline name (:data:`TEXT_BASELINES`), a
    composite name or :class:`lrp.Composite`, or a function ``(model, ids, target) -> relevance``."""
    from ..composites import COMPOSITES

    def checked(fn: Callable[[torch.nn.Module, Tensor, Tensor, Words], object]) -> TextMethod:
        def method(model: torch.nn.Module, ids: Tensor, target: Tensor, words: Words = None) -> Tensor:
            r = fn(model, ids, target, words)
            r = getattr(r, "relevance", r)
            if not isinstance(r, Tensor) or tuple(r.shape) != tuple(ids.shape):
                got = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
                raise ValueError(f"text method {spec!r} returned relevance {got}; expected one value per token "
                                 f"{tuple(ids.shape)}")
            return r.detach().float()
        return method

    if isinstance(spec, str):
        key = spec.lower().replace("_", "-")
        if key == "occlusion":
            return checked(lambda m, x, t, w: occlusion(m, x, t, words=w, pad_id=pad_id))
        if key == "random":
            return checked(lambda m, x, t, w: random(m, x, t, seed=seed, pad_id=pad_id))
        if key in TEXT_BASELINES:
            fn = TEXT_BASELINES[key]
            return checked(lambda m, x, t, w: fn(m, x, t))
        if key in COMPOSITES:
            from ..pipeline.text import text_composite
            comp_named = text_composite(key)  # refuses composites that need input bounds, before any work
            return checked(lambda m, x, t, w: lrp_relevance(m, x, t, comp_named))
        usable = [c for c in COMPOSITES if c != "epsilon-gamma-box"]  # z^B needs input bounds: ids have none
        raise ValueError(f"unknown text method {spec!r}; give a composite ({', '.join(usable)}), a baseline "
                         f"({', '.join(TEXT_BASELINES)}), an lrp.Composite or a function (model, ids, target) -> "
                         f"relevance")
    if isinstance(spec, Composite):
        comp = spec
        return checked(lambda m, x, t, w: lrp_relevance(m, x, t, comp))
    if callable(spec):
        user = spec
        return checked(lambda m, x, t, w: user(m, x, t))
    raise TypeError(f"a text method must be a name, an lrp.Composite or a function; got {type(spec).__name__}")


def _lengths(ids: Tensor, pad_id: int) -> Tensor:
    """Per row, the position after its last real token (0 for a row of padding)."""
    pos = torch.arange(1, ids.shape[1] + 1, device=ids.device)
    return torch.where(ids != pad_id, pos, torch.zeros_like(pos)).amax(1) if ids.shape[1] else \
        torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)


def explain_tokens(method: TextMethod, model: torch.nn.Module, ids: Tensor, target: Tensor, *,
                   words: Words = None, pad_id: int = 0, batch_size: int = 32, trim: bool = True) -> Tensor:
    """``method``'s relevance ``(batch, seq)`` for ``ids``, texts of similar length explained together in chunks of
    ``batch_size``; ``trim``: each chunk without its trailing columns of padding (for models that mask padding,
    which then give each text what it gets alone)."""
    relevance = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    lengths = _lengths(ids, pad_id)
    order = torch.argsort(lengths, stable=True)
    for chunk in order.split(max(1, batch_size)):
        width = max(1, int(lengths[chunk].max())) if trim else ids.shape[1]
        sub_words = None if words is None else [words[int(i)] for i in chunk]
        relevance[chunk, :width] = method(model, ids[chunk, :width], target[chunk], sub_words).to(relevance.device)
    return relevance


# --------------------------------------------------------------------------- token deletion

@dataclass
class TokenCurve(PerturbationCurve):
    """Scores ``(N, steps + 1)`` of each text after each step of token deletion; ``fractions``: ``k / steps``;
    ``removed``: the number of tokens removed per text and step; ``removal``: ``"mask"`` or ``"delete"``.
    ``aopc``, ``auc`` and ``mean`` as for :class:`~lrp.evaluate.PerturbationCurve`."""

    removal: str = "mask"
    removed: Optional[np.ndarray] = None


def remove_tokens(ids: Tensor, removed: Tensor, removal: str, pad_id: int = 0) -> Tensor:
    """``ids`` with the positions in ``removed`` (bool, like ``ids``) taken out: ``"mask"``: set to ``pad_id``;
    ``"delete"``: dropped, the remaining real tokens moved left in their order, ``pad_id`` after them."""
    if removal == "mask":
        return torch.where(removed, torch.full_like(ids, pad_id), ids)
    if removal == "delete":
        keep = ~removed & (ids != pad_id)
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        kept = keep.sum(1, keepdim=True)
        moved = ids.gather(1, order)
        return torch.where(torch.arange(ids.shape[1], device=ids.device) < kept, moved, torch.full_like(ids, pad_id))
    raise ValueError(f"removal must be 'mask' (replace by the pad id) or 'delete' (drop and close the gap), "
                     f"got {removal!r}")


def _widths(rank: Tensor, counts: Tensor, real: Tensor, removal: str) -> Tensor:
    """``(N, steps + 1)``: the length of each text (to its last real token) after each step."""
    if removal == "delete":
        return real.sum(1, keepdim=True) - counts
    pos = torch.arange(1, rank.shape[1] + 1, device=rank.device)
    kept = real[:, None, :] & (rank[:, None, :] >= counts[:, :, None])  # (N, steps + 1, seq)
    return torch.where(kept, pos, torch.zeros_like(pos)).amax(2) if rank.shape[1] else counts * 0


def token_deletion_curve(
    model: torch.nn.Module,
    ids: Tensor,
    relevance: Tensor,
    target: TargetSpec = None,
    *,
    order: str = "morf",
    steps: int = 20,
    removal: str = "mask",
    score: Score = "logit",
    pad_id: int = 0,
    batch_size: int = 256,
    trim: bool = True,
) -> TokenCurve:
    """Remove the real tokens of each text in the order of ``relevance`` and record the target's score after
    each of ``steps`` equal parts (see the module docstring).

    Args:
        model: token ids ``(batch, seq)`` -> class scores; run in eval mode without gradients.
        ids: long ``(N, seq)``, right-padded with ``pad_id``; padding is never ranked nor removed.
        relevance: ``(N, seq)``, one value per token (values at padding are ignored).
        target: the class whose score is tracked (default: the prediction on ``ids``), fixed for all steps.
        order: ``"morf"`` (most relevant first) or ``"lerf"`` (least relevant first); ties keep text order.
        removal: ``"mask"`` or ``"delete"``.
        score: ``"logit"``, ``"probability"`` (softmax) or ``(output, target) -> (N,)``.
        batch_size: perturbed texts per forward pass (texts of similar length go together).
        trim: run each pass without its trailing columns of padding (right for models that mask padding);
            ``False``: always at the full width of ``ids``.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be 'morf' (most relevant first) or 'lerf' (least relevant first), got {order!r}")
    if removal not in REMOVALS:
        raise ValueError(f"removal must be 'mask' (replace by the pad id) or 'delete' (drop and close the gap), "
                         f"got {removal!r}")
    if ids.ndim != 2 or ids.is_floating_point():
        raise ValueError(f"ids must be token ids (N, seq), got {ids.dtype} {tuple(ids.shape)}")
    if tuple(relevance.shape) != tuple(ids.shape):
        raise ValueError(f"relevance must have one value per token {tuple(ids.shape)}, got {tuple(relevance.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    score_of = _score_fn(score)
    real = ids != pad_id
    n = real.sum(1)
    key = relevance.to(ids.device).float().masked_fill(~real, float("-inf") if order == "morf" else float("inf"))
    sort = torch.argsort(key, dim=1, descending=(order == "morf"), stable=True)
    rank = torch.empty_like(sort).scatter_(1, sort, torch.arange(ids.shape[1], device=ids.device).expand_as(sort))
    ks = torch.arange(steps + 1, device=ids.device)
    counts = torch.round(ks[None, :] * n[:, None].double() / steps).long()  # (N, steps + 1), half to even
    rows = ids.shape[0]
    scores = torch.empty(rows, steps + 1, dtype=torch.float64)
    with model_lock(model), frozen(model), torch.no_grad():
        out = model_output(model(ids))
        idx = class_targets(out, target)
        if idx is None:
            raise ValueError("token deletion needs a model with class scores (batch, classes)")
        pairs = torch.cartesian_prod(torch.arange(rows), ks.cpu()).to(ids.device) if rows else \
            torch.zeros(0, 2, dtype=torch.long, device=ids.device)
        if trim:  # group perturbed texts of similar length: each pass runs without its trailing padding
            widths = _widths(rank, counts, real, removal).reshape(-1)
            pairs = pairs[torch.argsort(widths, stable=True)]
        for chunk in pairs.split(max(1, batch_size)):
            s, k = chunk[:, 0], chunk[:, 1]
            width = max(1, int(widths[s * (steps + 1) + k].max())) if trim else ids.shape[1]
            removed = (rank[s] < counts[s, k][:, None]) & real[s]
            perturbed = remove_tokens(ids[s], removed, removal, pad_id)[:, :width]
            result = score_of(model_output(model(perturbed)), idx[s])
            scores[s.cpu(), k.cpu()] = result.double().cpu()
    return TokenCurve(ks.cpu().numpy() / steps, scores.numpy(), order, idx.cpu().numpy(), removal,
                      counts.cpu().numpy())

