"""``lrp evaluate --model spam``: token deletion on held-out mails for LRP composites and baselines; a report.

:func:`run_spam` explains held-out mails of the built-in spam classifier (:mod:`lrp.spam`) with each method,
removes their tokens in the order of the relevance (:func:`lrp.evaluate.tokens.token_deletion_curve`) by masking
and by deleting, and writes into the output folder ``results.csv`` (a row per method and way of removing),
``curves_<removal>_<order>.png`` (mean curves) and ``report.md`` (a verdict computed from the numbers, the
metrics' definitions, which methods give the same map, the tables and the pictures).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from .compare import write_csv
from .report import SCORE_TEXT, _decimals, _perturbation_verdict, _unit, markdown_table, method_kind, paired_gap
from .tokens import (DEFAULT_TEXT_METHODS, REMOVALS, TextMethodSpec, TokenCurve, explain_tokens,
                     resolve_text_method, token_deletion_curve)

Tensor = torch.Tensor

REMOVAL_TEXT = {"mask": "Masking (tokens replaced by the pad id, which the model ignores; positions kept)",
                "delete": "Deleting (tokens dropped and the gap closed; the tokens after them move left)"}
SAME_MAP = 1e-3  # methods whose maps differ by less than this (relative L2, worst mail) give the same map


def pick_mails(count: int, total: int) -> list[int]:
    """``count`` positions spread evenly over ``total`` (``k * total // count``): the held-out file lists
    ham before spam, so its first mails would all be ham."""
    count = max(0, min(count, total))
    return [k * total // count for k in range(count)]


def same_maps(relevance: Mapping[str, Tensor], ids: Tensor, pad_id: int = 0,
              tolerance: float = SAME_MAP) -> list[tuple[list[str], float]]:
    """Groups of methods whose maps coincide: ``||R_a - R_b|| / max(||R_a||, ||R_b||)`` over each mail's real
    tokens at most ``tolerance`` on every mail; with the largest such difference in the group."""
    real = (ids != pad_id).float()
    names = list(relevance)
    groups: list[tuple[list[str], float]] = []
    seen: set[str] = set()
    for a in names:
        if a in seen:
            continue
        members, worst = [a], 0.0
        for b in names[names.index(a) + 1:]:
            if b in seen:
                continue
            ra, rb = relevance[a].float() * real, relevance[b].float() * real
            scale = torch.maximum(ra.norm(dim=1), rb.norm(dim=1)).clamp_min(1e-12)
            diff = float(((ra - rb).norm(dim=1) / scale).max()) if len(ids) else 0.0
            if diff <= tolerance:
                members.append(b)
                worst = max(worst, diff)
        if len(members) > 1:
            seen.update(members)
            groups.append((members, worst))
    return groups


def _names(ms: Sequence[str]) -> str:
    quoted = [f"`{m}`" for m in ms]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _leader(metric: str, rows: Sequence[Mapping], kinds: Mapping[str, str], samples: Mapping[str, np.ndarray],
            decimals: int, larger: bool) -> tuple[str, str]:
    """(the best method on ``metric`` other than random, how it compares with the runner-up)."""
    ranked = sorted((r for r in rows if kinds[r["method"]] != "random"), key=lambda r: r[metric], reverse=larger)
    top = ranked[0]
    if len(ranked) < 2:
        return top["method"], f"{top[metric]:.{decimals}f}"
    runner = ranked[1]
    values = {r["method"]: r[metric] for r in ranked[:2]}
    d, se = paired_gap(top["method"], runner["method"], values, samples)
    margin = f"{d:+.{decimals}f}" + ("" if se is None else f" ± {2 * se:.{decimals}f}")
    close = "within the noise of" if se is not None and abs(d) <= 2 * se else "ahead of"
    return top["method"], (f"{top[metric]:.{decimals}f}, {close} `{runner['method']}` at "
                           f"{runner[metric]:.{decimals}f} ({margin})")


def _extra_verdict(rows: Sequence[Mapping], kinds: Mapping[str, str], decimals: int,
                   lerf: Mapping[str, np.ndarray], abpc: Mapping[str, np.ndarray]) -> str:
    """LeRF and ABPC leaders for one way of removing, each against its runner-up."""
    if not any(kinds[r["method"]] != "random" for r in rows):
        return ""
    best_lerf, lerf_text = _leader("aopc_lerf", rows, kinds, lerf, decimals, larger=False)
    best_abpc, abpc_text = _leader("abpc", rows, kinds, abpc, decimals, larger=True)
    return (f" LeRF (smaller is better; below 0: removing the least relevant tokens first raises the score): "
            f"`{best_lerf}`, {lerf_text}. ABPC: `{best_abpc}`, {abpc_text}.")


def _homogeneous_note(groups: Sequence[tuple[list[str], float]]) -> str:
    together = [set(g) for g, _ in groups]
    note = []
    if any({"gradient-x-input", "integrated-gradients"} <= g for g in together):
        note.append("SpamNet has no biases and only ReLU, max over positions and linear maps after the embedding, "
                    "so it is positively homogeneous, f(a e) = a f(e) for a > 0: the gradient is the same at every "
                    "point of the path from the zero embedding, and integrated gradients equals gradient x input "
                    "whatever the number of steps.")
    if any({"gradient-x-input"} <= g and g & {"epsilon", "lrp0"} for g in together):
        note.append("On a ReLU network without biases LRP-0 is gradient x input, and the epsilon rule differs from "
                    "LRP-0 only by its stabiliser (1e-6 here).")
    return " ".join(note)


def _plot(curves: Mapping[str, TokenCurve], path: Path, title: str, ylabel: str) -> None:
    from .plots import plot_curves, save_figure
    fig = plot_curves(dict(curves), None, title)
    order = next(iter(curves.values())).order if curves else "morf"
    fig.axes[0].set_ylabel(ylabel)
    fig.axes[0].set_xlabel("fraction of the mail's tokens removed ("
                           + ("most" if order == "morf" else "least") + " relevant first)")
    save_figure(fig, path)


def run_spam(
    out,
    *,
    limit: int = 200,
    methods: Optional[Mapping[str, TextMethodSpec] | Sequence[str]] = None,
    steps: int = 10,
    removal: Sequence[str] = REMOVALS,
    score: str = "logit",
    batch_size: int = 32,
    seed: int = 0,
    command: str = "",
    log: Callable[[str], object] = print,
) -> Path:
    """Token deletion for the built-in spam model on ``limit`` held-out mails (spread evenly over the held-out
    file, :func:`pick_mails`); write ``report.md``, ``results.csv`` and ``curves_<removal>_<order>.png`` into
    ``out``; return the path of ``report.md``.

    ``methods``: names (composites for token ids, :data:`~lrp.evaluate.tokens.TEXT_BASELINES`) or a mapping
    ``{name: composite name, lrp.Composite or function (model, ids, target) -> relevance}``; default
    :data:`~lrp.evaluate.tokens.DEFAULT_TEXT_METHODS`. ``steps``: parts each mail's tokens are removed in;
    ``removal``: ``"mask"`` and/or ``"delete"``; ``score``: ``"logit"`` or ``"probability"``;
    ``batch_size``: mails explained together (perturbed mails run 8 times as many per pass); ``seed``: of
    ``random``. Every method explains the class the model predicts."""
    from ..models import spam
    from ..spam import SPAM_CLASSES, SPAM_HELDOUT_SIZE, SPAM_PAD_ID, encode_batch, spam_heldout

    began = time.perf_counter()
    if limit < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"limit, steps and batch_size must be >= 1; got {limit}, {steps}, {batch_size}")
    removals = list(dict.fromkeys(removal))
    for r in removals:
        if r not in REMOVALS:
            raise ValueError(f"removal must be among {REMOVALS}, got {r!r}")
    if not removals:
        raise ValueError(f"give at least one way of removing tokens: {REMOVALS}")
    if score not in SCORE_TEXT:
        raise ValueError(f"score must be one of {', '.join(SCORE_TEXT)}, got {score!r}")
    named: dict[str, TextMethodSpec] = dict(DEFAULT_TEXT_METHODS) if methods is None else (
        dict(methods) if isinstance(methods, Mapping) else {m: m for m in methods})
    if not named:
        raise ValueError("give at least one method")
    resolved = {name: resolve_text_method(spec, pad_id=SPAM_PAD_ID, seed=seed) for name, spec in named.items()}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)

    model, tokenizer = spam()
    mails = spam_heldout()
    picks = pick_mails(limit, len(mails))
    chosen = [mails[k] for k in picks]
    ids, encoded = encode_batch([m.text for m in chosen], tokenizer, mail=False)  # parsed already
    words = [e.words for e in encoded]
    with torch.no_grad():
        logits = model(ids)
    target = logits.argmax(1)
    labels = torch.tensor([m.label for m in chosen])
    accuracy = float((target == labels).float().mean())
    lengths = (ids != SPAM_PAD_ID).sum(1)
    log(f"{len(chosen)} held-out mails, {int(lengths.sum()):,} tokens; explaining with {len(named)} methods")

    heatmaps: dict[str, Tensor] = {}
    ms: dict[str, float] = {}
    zero: dict[str, float] = {}  # share of the real tokens whose relevance is exactly 0
    real = ids != SPAM_PAD_ID
    for name, method in resolved.items():
        explain_tokens(method, model, ids[:1, :max(1, int(lengths[0]))], target[:1], words=words[:1],
                       pad_id=SPAM_PAD_ID)  # warm-up: first-call costs are not timed
        t0 = time.perf_counter()
        heatmaps[name] = explain_tokens(method, model, ids, target, words=words, pad_id=SPAM_PAD_ID,
                                        batch_size=batch_size)
        ms[name] = 1000 * (time.perf_counter() - t0) / len(chosen)
        zero[name] = float(((heatmaps[name] == 0) & real).sum()) / max(1, int(real.sum()))
        log(f"  {name}: {ms[name]:.1f} ms per mail")

    kinds = {name: method_kind(name, spec) for name, spec in named.items()}
    groups = same_maps(heatmaps, ids, SPAM_PAD_ID)
    shared = {m: g[0] for g, _ in groups for m in g}  # the same map: its curves are computed once
    rows: list[dict] = []
    per_sample: dict[str, dict[str, np.ndarray]] = {}  # per-mail MoRF AOPC, by removal and method
    per_lerf: dict[str, dict[str, np.ndarray]] = {}
    per_abpc: dict[str, dict[str, np.ndarray]] = {}
    curves: dict[str, dict[str, dict[str, TokenCurve]]] = {}
    for rem in removals:
        t0 = time.perf_counter()
        curves[rem] = {}
        per_sample[rem], per_lerf[rem], per_abpc[rem] = {}, {}, {}
        for name, relevance in heatmaps.items():
            if shared.get(name, name) in curves[rem]:
                by_order = curves[rem][shared[name]]
            else:
                by_order = {o: token_deletion_curve(model, ids, relevance, target, order=o, steps=steps,
                                                    removal=rem, score=score, pad_id=SPAM_PAD_ID,
                                                    batch_size=8 * batch_size) for o in ("morf", "lerf")}
            curves[rem][name] = by_order
            per_sample[rem][name] = by_order["morf"].aopc
            per_lerf[rem][name] = by_order["lerf"].aopc
            per_abpc[rem][name] = by_order["lerf"].auc - by_order["morf"].auc
            rows.append({"method": name, "kind": kinds[name], "removal": rem,
                         "aopc_morf": float(by_order["morf"].aopc.mean()),
                         "aopc_lerf": float(by_order["lerf"].aopc.mean()),
                         "auc_morf": float(by_order["morf"].auc.mean()),
                         "auc_lerf": float(by_order["lerf"].auc.mean()),
                         "abpc": float((by_order["lerf"].auc - by_order["morf"].auc).mean()),
                         "zero_share": zero[name], "ms_per_sample": ms[name]})
        log(f"removal={rem}: {len(named) - len(shared) + len(groups)} distinct maps x {len(chosen)} mails x "
            f"{steps} steps x 2 orders in "
            f"{time.perf_counter() - t0:.1f} s")
    write_csv(rows, folder / "results.csv")

    pictures: dict[str, list[str]] = {}
    for rem in removals:
        pictures[rem] = []
        for order in ("morf", "lerf"):
            name = f"curves_{rem}_{order}.png"
            _plot({m: c[order] for m, c in curves[rem].items()}, folder / name,
                  f"{order.upper()}, tokens removed by {'masking' if rem == 'mask' else 'deleting'}",
                  f"{SCORE_TEXT[score]} of the explained class")
            pictures[rem].append(f"![{rem} {order} curves]({name})")

    # ------------------------------------------------------------------ the report
    decimals = _decimals([r["aopc_morf"] for r in rows])
    verdict = [f"**Verdict** ({len(chosen):,} held-out mails; MoRF AOPC: how far removing the most relevant tokens "
               f"first lowers the explained {SCORE_TEXT[score]}, in {_unit(score)}, larger is better; ±: two "
               f"standard errors of the per-mail difference):"]
    # methods with the same map count once in the verdict, under all their names
    label = {name: name for name in named}
    merged_kinds = dict(kinds)
    for members, _ in groups:
        joined = " = ".join(members)
        for m in members:
            label[m] = joined
        merged_kinds[joined] = "lrp" if any(kinds[m] == "lrp" for m in members) else kinds[members[0]]
    best: dict[str, str] = {}
    for rem in removals:
        merged = {}
        for row in rows:
            if row["removal"] == rem and label[row["method"]] not in merged:
                merged[label[row["method"]]] = {**row, "method": label[row["method"]]}
        values = {key: row["aopc_morf"] for key, row in merged.items()}
        def by_label(table: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {label[m]: a for m, a in reversed(list(table.items()))}
        samples = by_label(per_sample[rem])
        best[rem] = max(values, key=lambda m: values[m])
        line = _perturbation_verdict(values, samples, merged_kinds, score, decimals)
        line += _extra_verdict(list(merged.values()), merged_kinds, decimals, by_label(per_lerf[rem]),
                               by_label(per_abpc[rem]))
        verdict.append(f"- {REMOVAL_TEXT[rem].split(' (')[0]}: {line}")
    if len(removals) > 1:
        leaders = {best[r] for r in removals}
        verdict.append("- Both ways of removing give " + (
            f"`{best[removals[0]]}` the highest MoRF AOPC." if len(leaders) == 1 else
            "different methods the highest MoRF AOPC: " + ", ".join(f"`{best[r]}` ({r})" for r in removals) + "."))
    mixed = [g for g, _ in groups if len({kinds[m] for m in g}) > 1 and any(label[g[0]] == best[r] for r in removals)]
    if mixed:
        verdict.append(f"- The leader is one map under several names: {_names(mixed[0])} are the same method on this "
                       f"model, so its lead is not a lead of LRP over " + _names(
                           [m for m in mixed[0] if kinds[m] != "lrp"]) + "; the comparison between families is "
                       "with the methods that give other maps.")
    if groups:
        verdict.append("- Same maps (their curves are computed once and shared): " + "; ".join(
            f"{_names(g)} (largest relative difference {d:.1e})" for g, d in groups) + ".")

    ham = sum(1 for mail in chosen if mail.label == 0)
    by_group: dict[str, int] = {}
    for mail in chosen:
        by_group[mail.group or "?"] = by_group.get(mail.group or "?", 0) + 1
    predicted = [SPAM_CLASSES[int(t)] for t in target]
    f0 = logits.gather(1, target[:, None])[:, 0]
    same_note = _homogeneous_note(groups)
    lines = [
        "# Token deletion on the spam model", "", *verdict, "",
        f"Data: {len(chosen)} of the {SPAM_HELDOUT_SIZE:,} held-out mails (`lrp.spam.spam_heldout()`), spread evenly "
        f"over the file (positions k * {len(mails)} // {len(chosen)}, k = 0..{len(chosen) - 1}; the file lists ham "
        f"before spam, so its first mails are all ham): {ham} ham, "
        f"{len(chosen) - ham} spam (" + ", ".join(f"{g}: {c}" for g, c in sorted(by_group.items())) + f"). "
        f"{int(lengths.min())} to {int(lengths.max())} tokens, {float(lengths.float().mean()):.0f} on average "
        f"(at most 512 are read). The model is right on {accuracy:.1%} of them; every method explains the class "
        f"it predicts ({predicted.count('ham')} ham, {predicted.count('spam')} spam), whose logit f_0 is "
        f"{float(f0.mean()):.2f} on average (median {float(f0.median()):.2f}).", "",
        f"Each mail's real tokens are removed in {steps} equal parts (round(k n / {steps}) of its n tokens after "
        f"step k). Written by `lrp.evaluate.text_report.run_spam` in {{seconds}} s"
        + (f" (`{command}`)." if command else "."), "",
        "## What the numbers mean", "",
        f"- `aopc_morf`, `aopc_lerf`: **AOPC**, area over the perturbation curve (Samek et al. 2017): the drop of "
        f"the explained class's {SCORE_TEXT[score]}, f_0 - f_k (f_k: after step k), averaged over the steps "
        f"k = 0..{steps} and the mails; in {_unit(score)}. MoRF: larger is better; LeRF: smaller (more negative) is "
        f"better.",
        f"- `auc_morf`, `auc_lerf`: **AUC**, area under the curve of f_k against the fraction removed, k / {steps} "
        f"(0 to 1), averaged over mails; in {_unit(score)}. MoRF: smaller is better; LeRF: larger is better.",
        f"- `abpc`: **ABPC** = AUC(LeRF) - AUC(MoRF) (Schulz et al. 2020), in {_unit(score)}; larger is better.",
        "- **MoRF** / **LeRF**: the order of removal, most / least relevant token first; ties (occlusion's tokens "
        "of one word, white space) go in text order. Padding is never ranked nor removed.",
        "- `zero_share`: the share of the mails' tokens whose relevance is exactly 0, from 0 to 1. Such tokens tie "
        "and are removed in text order: after the positive ones in MoRF, before them in LeRF.",
        "- `ms_per_sample`: time to explain one mail, in milliseconds (after one warm-up call), on this machine.",
        "- **random** (relevance drawn at random) is the floor: a method that does not beat it on MoRF AOPC does "
        "not rank tokens usefully.",
        f"- Removal: {'; '.join(REMOVAL_TEXT[r] for r in removals)}. With every token removed the model sees "
        f"only padding and both logits are 0 (no biases), so every curve ends at "
        f"{'0' if score == 'logit' else '0.5'}.", "",
        "## Methods", "",
        "- LRP composites, through `lrp.explain(model, ids, target, composite)`: relevance starts at the explained "
        "logit and ends at the embedding output, summed over the embedding dimension (one value per token)."
        " On SpamNet the rules land on its two layers (the convolution, then the classifier) as follows: "
        + "; ".join(f"`{n}`: {_rules(model, ids, n, named[n])}" for n in named if kinds[n] == "lrp") + ".",
        "- `gradient`: ||dS/de||_2 over the embedding dimension, **unsigned**: it ranks tokens by how sensitive "
        "the score is to them, not by whether they speak for the class.",
        "- `gradient-x-input`: sum over the embedding dimension of e * dS/de; signed.",
        "- `integrated-gradients`: on the embeddings, from the zero embedding (SpamNet's pad embedding), 32 steps, "
        "midpoint rule; signed.",
        "- `occlusion`: leave one word out (its tokens replaced by the pad id); the drop of the logit is shared "
        "equally by the word's tokens; white space gets 0. It is made of the same perturbation as masking, so it "
        "has a home advantage there: its first MoRF steps remove what it measured.",
        "- `random`: N(0, 1) per token, seeded (seed " + str(seed) + ").", "",
    ]
    if groups:
        lines += ["Methods that give the same map on these mails (relative L2 difference of the maps at most "
                  f"{SAME_MAP:g} on every mail): " + "; ".join(f"{_names(g)} ({d:.1e})" for g, d in groups)
                  + ". Their token-deletion curves are computed once (for the first named) and shared; their "
                  "rows in the tables are therefore equal. " + same_note, ""]
    lines += ["## Results", ""]
    keys = ["method", "kind", "aopc_morf", "aopc_lerf", "auc_morf", "auc_lerf", "abpc", "zero_share",
            "ms_per_sample"]
    for rem in removals:
        table = sorted((r for r in rows if r["removal"] == rem), key=lambda r: -r["aopc_morf"])
        lines += [f"### {REMOVAL_TEXT[rem]}", "", markdown_table(table, keys), "", " ".join(pictures[rem]), ""]
    first = removals[0]
    dips = [(m, float(c["morf"].mean[:-1].min())) for m, c in curves[first].items()
            if c["morf"].mean[:-1].min() < 0 and shared.get(m, m) == m]
    dips = sorted(dips, key=lambda d: d[1])[:3]
    zeros = [m for m in named if zero[m] >= 0.2 and kinds[m] != "random"]
    lines += ["## Caveats", "",
              "- Both masking and deleting show the model inputs it never saw in training (holes, or glued-together "
              "fragments); the drop of the score mixes what the tokens meant with how the model reacts to such "
              "inputs. Deleting also changes which tokens share a convolution window.",
              "- The score tracked is the logit of the predicted class; SpamNet's two logits are opposite, so a "
              "drop below 0 means the mail has turned to the other class." if score == "logit" else
              "- The score tracked is the softmax probability of the predicted class; below 0.5 the mail has turned "
              "to the other class.",
              *(["- The mean MoRF curves (" + first + ") go below 0 before the last step (lowest: " + ", ".join(
                  f"`{m}` {v:.2f}" for m, v in dips) + f" {_unit(score)}): once the tokens that speak for the "
                  "class are gone, those against it remain and turn the mail to the other class; the last step, "
                  "with every token removed, brings every curve back to 0."] if dips else []),
              *([f"- {_names(zeros)} give relevance exactly 0 to "
                 + (f"between {min(zero[m] for m in zeros):.0%} and {max(zero[m] for m in zeros):.0%}"
                    if len({round(zero[m], 2) for m in zeros}) > 1 else f"{zero[zeros[0]]:.0%}")
                 + " of the tokens (`zero_share`). On SpamNet these are the tokens in no 5-token window that wins a "
                 "filter's maximum over the mail: gradients and LRP do not reach them, and removing one of them "
                 "alone changes nothing (occlusion also gives 0 to white space). Between the tokens for and against "
                 "the class, these methods' curves therefore remove a large block of tokens in text order, not by "
                 "relevance."]
                if zeros else []),
              "- AOPC averages over steps, so the first steps (a few tokens) weigh as much as the last; per-mail "
              "differences are paired (the same mails for every method).",
              "", "Raw numbers: `results.csv`."]
    seconds = time.perf_counter() - began
    text = "\n".join(lines).replace("{seconds}", f"{seconds:.0f}")
    (folder / "report.md").write_text(text, encoding="utf-8")
    log(markdown_table(rows, ["method", "removal", "aopc_morf", "aopc_lerf", "abpc", "ms_per_sample"]))
    log(f"wrote {folder / 'report.md'} in {seconds:.1f} s")
    return folder / "report.md"


def _rules(model: torch.nn.Module, ids: Tensor, name: str, spec: object) -> str:
    """The rules a composite gives the model's layers, from one explained mail."""
    from ..composites import Composite
    from ..explain import explain
    from ..pipeline.text import text_composite
    try:
        comp = spec if isinstance(spec, Composite) else text_composite(str(spec))
        rules = explain(model, ids[:1, :max(1, int((ids[0] != 0).sum()))], None, comp).rules
    except Exception as exc:  # the report still says what it could not find out
        return f"(rules unknown: {type(exc).__name__})"
    return ", ".join(f"{layer} {rule}" for layer, rule in rules.items()) if rules else "(none recorded)"


__all__ = ["run_spam", "pick_mails", "same_maps"]
