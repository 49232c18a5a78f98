"""Reproduce the built-in spam classifier: python scripts/train_spam.py [--data spamassassin.jsonl.gz] [--out DIR].

Reads the SpamAssassin corpus (6,046 raw mails, JSON lines ``{"id", "group", "label", "md5", "text"}``; by
default from ``../shared/data`` beside the repository), parses each mail to the text the model reads
(``lrp.mail.mail_text``: subject and plain-text body), splits it (``lrp.spam.is_heldout``: 1,190 held out),
trains a byte-level BPE tokenizer (8,000 tokens) and :class:`lrp.spam.SpamNet` on the training split only
(fixed seed), and writes into ``src/lrp/data/``: ``spam_tokenizer.json``, ``spam_cnn.pt`` (state dict, config,
held-out accuracy), ``spam_heldout.jsonl.gz`` (the held-out mails as parsed text) and ``spam_examples.json``
(20 of them for demos). Prints the held-out accuracy: put it into ``lrp.spam.SPAM_ACCURACY``.

``--dev`` trains on four fifths of the training split and reports the accuracy on the other fifth instead (for
choosing settings without looking at the held-out mails); it writes nothing.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import time
from pathlib import Path

import torch
import torch.nn as nn

from lrp import spam as S
from lrp.mail import mail_text

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "spamassassin.jsonl.gz"


def read_corpus(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:
        r["parsed"] = mail_text(r["text"])
    return rows


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[S.SPAM_PAD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.token_to_id(S.SPAM_PAD) == S.SPAM_PAD_ID
    tok.enable_truncation(S.SPAM_MAX_TOKENS)
    return tok


def batches(lengths: list[int], batch_size: int, g: random.Random) -> list[list[int]]:
    """Batches of texts of similar length (little padding), in a random order."""
    order = sorted(range(len(lengths)), key=lambda k: (lengths[k], g.random()))
    out = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    g.shuffle(out)
    return out


def pad(rows: list[list[int]]) -> torch.Tensor:
    n = max(len(r) for r in rows)
    return torch.tensor([r + [S.SPAM_PAD_ID] * (n - len(r)) for r in rows], dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path(S.__file__).parent / "data")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a busy machine more threads wait on each other)")
    parser.add_argument("--dev", action="store_true", help="train on 4/5 of the training split, report the rest")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()

    rows = read_corpus(args.data)
    held = [r for r in rows if S.is_heldout(r["parsed"])]
    train = [r for r in rows if not S.is_heldout(r["parsed"])]
    if args.dev:  # another digit of the same hash: a validation fifth of the training split
        def digit(r: dict) -> int:
            return int(hashlib.sha256(S.heldout_key(r["parsed"]).encode()).hexdigest(), 16) // 5 % 5
        held = [r for r in train if digit(r) == 0]
        train = [r for r in train if digit(r) != 0]
    print(f"parsed {len(rows)} mails in {time.time() - t0:.0f} s: {len(train)} train, {len(held)} "
          f"{'validation' if args.dev else 'held out'} ({sum(r['label'] == 'spam' for r in held)} spam)")

    t1 = time.time()
    tok = train_tokenizer([r["parsed"] for r in train], args.vocab)
    ids = [e.ids for e in tok.encode_batch([r["parsed"] for r in train])]
    y = torch.tensor([S.SPAM_CLASSES.index(r["label"]) for r in train])
    held_mails = [S.SpamMail(r["id"], S.SPAM_CLASSES.index(r["label"]), r["parsed"], r["group"]) for r in held]
    print(f"tokenizer: {tok.get_vocab_size()} tokens in {time.time() - t1:.0f} s; "
          f"{sum(len(i) >= S.SPAM_MAX_TOKENS for i in ids)} of {len(ids)} training mails cut at {S.SPAM_MAX_TOKENS}")
    tok.enable_padding(direction="right", pad_id=S.SPAM_PAD_ID, pad_token=S.SPAM_PAD)

    torch.manual_seed(args.seed)
    g = random.Random(args.seed)
    model = S.SpamNet(vocab_size=tok.get_vocab_size())
    batch_size = 32
    steps = args.epochs * ((len(ids) + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps, pct_start=0.2)
    t2 = time.time()
    for epoch in range(args.epochs):
        model.train()
        total = 0.0
        for idx in batches([len(i) for i in ids], batch_size, g):
            loss = nn.functional.cross_entropy(model(pad([ids[k] for k in idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        acc = S.spam_accuracy(model, tok, held_mails)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(ids):.4f}, "
              f"{'validation' if args.dev else 'held-out'} accuracy {acc:.4f} ({time.time() - t2:.0f} s)")
    model.eval()

    # Centre the output layer: the softmax of two logits depends only on their difference, so rows
    # (-(w1 - w0) / 2, (w1 - w0) / 2) give the same probabilities, and "ham" is explained as minus "spam".
    with torch.no_grad():
        before = torch.softmax(model(pad([ids[k] for k in range(8)])), 1)
        d = (model.classifier.weight[1] - model.classifier.weight[0]) / 2
        model.classifier.weight.copy_(torch.stack([-d, d]))
        after = torch.softmax(model(pad([ids[k] for k in range(8)])), 1)
        assert torch.allclose(before, after, atol=1e-5), (before, after)
    acc = S.spam_accuracy(model, tok, held_mails)
    train_seconds = time.time() - t0
    print(f"{'validation' if args.dev else 'held-out'} accuracy {acc:.4f} "
          f"({round(acc * len(held_mails))}/{len(held_mails)}); {train_seconds:.0f} s in all")
    if args.dev:
        return

    args.out.mkdir(parents=True, exist_ok=True)
    tok.no_truncation()
    tok.no_padding()
    (args.out / S.SPAM_TOKENIZER).write_text(tok.to_str(), encoding="utf-8")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "config": model.config, "accuracy": acc, "heldout": len(held_mails),
                "seed": args.seed, "epochs": args.epochs}, args.out / S.SPAM_CHECKPOINT)
    lines = [json.dumps({"id": r["id"], "group": r["group"], "label": r["label"], "md5": r["md5"],
                         "text": r["parsed"]}, ensure_ascii=False) for r in held]
    with gzip.GzipFile(args.out / S.SPAM_HELDOUT, "wb", mtime=0) as f:  # mtime 0: the same bytes every run
        f.write(("\n".join(lines) + "\n").encode("utf-8"))
    # demo examples: held-out mails of moderate length, 10 per class, the first in a seeded shuffle
    pool = [r for r in held if 200 <= len(r["parsed"]) <= 2500]
    random.Random(args.seed).shuffle(pool)
    examples = [r for label in S.SPAM_CLASSES for r in [r for r in pool if r["label"] == label][:10]]
    examples.sort(key=lambda r: r["id"])
    (args.out / S.SPAM_EXAMPLES).write_text(json.dumps(
        [{"id": r["id"], "group": r["group"], "label": r["label"], "md5": r["md5"], "text": r["parsed"]}
         for r in examples], ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for name in (S.SPAM_TOKENIZER, S.SPAM_CHECKPOINT, S.SPAM_HELDOUT, S.SPAM_EXAMPLES):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
