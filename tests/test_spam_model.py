"""The built-in spam classifier (``lrp.models.spam``): the shipped checkpoint, tokenizer and held-out mails, its
held-out accuracy, what it reads of a mail, and LRP on it (conservation, padding, batches)."""

import gzip
import json
from pathlib import Path

import pytest
import torch

import lrp
from lrp import mail, spam as S
from lrp.visualize import token_html

tokenizers = pytest.importorskip("tokenizers")

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spamassassin.jsonl.gz"

RAW = """From someone@example.org  Thu Aug 22 12:36:23 2002
Received: from mx.example.org by localhost; Thu, 22 Aug 2002 12:36:16 +0100
X-Spam-Status: No, hits=-3.1 required=5.0
List-Id: <ilug.linux.ie>
From: Someone <someone@example.org>
To: zzzz@spamassassin.taint.org
Subject: =?iso-8859-1?q?Re=3A_=5BILUG=5D_caf=E9_meeting?=
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="XX"

--XX
Content-Type: text/plain; charset=iso-8859-1
Content-Transfer-Encoding: quoted-printable

See you at the caf=E9 at 8, yyyy.
Mail me at jm@netnoteinc.com.

--=20
Irish Linux Users' Group: ilug@linux.ie
http://www.linux.ie/mailman/listinfo/ilug for (un)subscription information.
List maintainer: listmaster@linux.ie
--XX
Content-Type: text/html; charset=iso-8859-1

<html><body><p>See you at the <b>caf&eacute;</b> at 8.</p></body></html>
--XX--
"""

HTML_ONLY = """From: a@b.c
Subject: WIN $$$ NOW
Content-Type: text/html

<html><head><style>p {color: red}</style><script>var x = 1;</script></head>
<body><p>Click&nbsp;<a href="http://x.example">HERE</a> to claim your prize!</p><!-- hidden words --></body></html>
"""


@pytest.fixture(scope="module")
def loaded():
    return lrp.models.spam()


def test_loader_returns_model_and_tokenizer(loaded):
    model, tok = loaded
    assert isinstance(model, S.SpamNet) and not model.training
    assert isinstance(tok, tokenizers.Tokenizer)
    assert tok.token_to_id(S.SPAM_PAD) == S.SPAM_PAD_ID == model.pad_id
    assert tok.get_vocab_size() == model.embedding.num_embeddings
    assert model.classes == S.SPAM_CLASSES == ("ham", "spam")
    assert model.accuracy == pytest.approx(S.SPAM_ACCURACY) == pytest.approx(lrp.models.SPAM_ACCURACY)
    assert torch.count_nonzero(model.embedding.weight[S.SPAM_PAD_ID]) == 0
    w = model.classifier.weight
    assert torch.allclose(w[0], -w[1])  # ham's row is minus spam's
    size = (Path(S.__file__).parent / "data" / S.SPAM_CHECKPOINT).stat().st_size
    assert size < 5e6
    random_model, _ = lrp.models.spam(pretrained=False)
    assert not torch.equal(random_model.conv.weight, model.conv.weight)


def test_heldout_accuracy(loaded):
    model, tok = loaded
    heldout = S.spam_heldout()
    assert len(heldout) == S.SPAM_HELDOUT_SIZE
    assert {m.label for m in heldout} == {0, 1}
    assert all(S.is_heldout(m.text) for m in heldout)  # the split rule, applied to the shipped text
    acc = S.spam_accuracy(model, tok, heldout)
    assert acc >= 0.97
    assert acc == pytest.approx(S.SPAM_ACCURACY, abs=1e-9)


@pytest.mark.skipif(not CORPUS.exists(), reason="the SpamAssassin corpus is not beside the repository")
def test_heldout_split_matches_the_corpus():
    """Every 7th mail of the corpus, parsed again: on the held-out side exactly when it is shipped as held out,
    with the same text."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 6046
    shipped = {(m.group, m.id): m for m in S.spam_heldout()}  # ids are unique within a corpus folder
    for row in rows[::7]:
        text = mail.mail_text(row["text"])
        key = (row["group"], row["id"])
        assert S.is_heldout(text) == (key in shipped)
        if key in shipped:
            assert shipped[key].text == text
            assert shipped[key].label_name == row["label"]


def test_examples():
    examples = lrp.models.spam_examples()
    assert len(examples) == 20
    assert sum(m.label for m in examples) == 10
    keys = {(m.group, m.id) for m in S.spam_heldout()}
    assert all((m.group, m.id) in keys for m in examples)


def test_mail_reads_subject_and_body_only():
    subject, body = mail.mail_parts(RAW)
    assert subject == "Re: café meeting"  # decoded, the list tag dropped
    assert body == "See you at the café at 8, user.\nMail me at user@example.com."  # plain part, no footer
    for give_away in ("Received", "X-Spam", "ILUG", "ilug", "listinfo", "taint", "zzzz", "netnoteinc"):
        assert give_away not in subject + body
    assert mail.mail_parts(RAW, strip_lists=False)[0] == "Re: [ILUG] café meeting"
    text = mail.mail_text(HTML_ONLY)
    assert text == "WIN $$$ NOW\n\nClick HERE to claim your prize!"
    assert mail.looks_like_mail(RAW) and not mail.looks_like_mail("Dear friend: you won")


def test_encode(loaded):
    _, tok = loaded
    enc = S.encode(RAW, tok)
    assert enc.text == mail.mail_text(RAW)
    ids, tokens, words = enc.tensor(), enc.tokens, enc.words
    assert ids.dtype == torch.long and ids.shape == (1, len(tokens)) == (1, len(words)) == (1, len(enc.spans))
    assert enc.ids == ids[0].tolist() and len(enc) == len(tokens) and not any(enc.special)
    assert enc.pieces == [enc.text[a:b] for a, b in enc.spans]
    assert tok.decode(ids[0].tolist()).strip() == enc.text
    assert S.token_strings(ids, tok) == tokens
    spans = [s for k, s in enumerate(enc.spans) if k == 0 or s != enc.spans[k - 1]]  # "é" is two tokens, one span
    assert "".join(enc.text[a:b] for a, b in spans).replace(" ", "").replace("\n", "") == "".join(enc.text.split())
    assert max(w for w in words if w is not None) == len(enc.text.split()) - 1
    plain = S.encode("Dear friend, you won!", tok, mail=False)
    assert plain.text == "Dear friend, you won!" and not plain.truncated
    long = S.encode("spam " * 2000, tok)
    assert len(long) == S.SPAM_MAX_TOKENS and long.truncated
    html = token_html(enc.tokens, torch.ones(len(enc.tokens)), merge=True, words=enc.words)
    assert "café" in html


def test_explain_conserves_and_ignores_padding(loaded):
    model, tok = loaded
    texts = [m.text for m in S.spam_examples()[:4]] + ["Hi, lunch tomorrow?"]
    ids, encs = S.encode_batch(texts, tok)
    lengths = [len(e) for e in encs]
    assert ids.shape == (len(texts), max(lengths)) and min(lengths) < max(lengths)
    for composite in ("epsilon-plus-flat", "epsilon"):
        res = lrp.explain(model, ids, target=1, composite=composite)
        assert res.relevance.shape == ids.shape and torch.isfinite(res.relevance).all()
        # no biases: the tokens' relevance adds up to the spam logit
        assert torch.allclose(res.relevance.sum(1), res.logits[:, 1], rtol=1e-4, atol=1e-5)
        for k, (enc, n) in enumerate(zip(encs, lengths)):
            assert torch.count_nonzero(res.relevance[k, n:]) == 0  # padding gets nothing
            alone = lrp.explain(model, enc.tensor(), target=1, composite=composite)
            assert torch.allclose(alone.logits, res.logits[k:k + 1], atol=1e-5)
            assert torch.allclose(alone.relevance[0], res.relevance[k, :n], atol=1e-5)
    ham = lrp.explain(model, ids, target=0, composite="epsilon")
    assert torch.allclose(ham.relevance, -lrp.explain(model, ids, target=1, composite="epsilon").relevance,
                          atol=1e-6)
    assert torch.equal(res.predicted, model(ids).argmax(1))


def test_one_call_explains_a_text_for_the_predicted_or_a_named_class():
    from lrp.errors import TargetError
    from lrp.spam import explain_text, spam_examples

    mail = next(m for m in spam_examples() if m.label == 1)
    res = explain_text(mail.text)
    assert res.predicted_label == res.explained == "spam" and res.probability > 0.5
    assert res.relevance.shape == (len(res.encoded.tokens),) and torch.isfinite(res.relevance).all()
    model, tok = lrp.models.spam()
    with torch.no_grad():
        logits = model(torch.tensor([res.encoded.ids]))[0]
    assert res.score == pytest.approx(float(logits[1]), rel=1e-5)
    # no biases: the tokens' relevance adds up to the explained logit (epsilon's stabiliser aside)
    torch.testing.assert_close(res.relevance.sum(), logits[1], rtol=1e-3, atol=1e-4)
    direct = lrp.explain(model, torch.tensor([res.encoded.ids]), target=1, composite="epsilon")
    torch.testing.assert_close(res.relevance, direct.relevance[0], rtol=1e-5, atol=1e-7)
    ham = explain_text(mail.text, target="ham")
    assert ham.explained == "ham" and ham.predicted_label == "spam" and ham.opposite == "spam"
    torch.testing.assert_close(ham.relevance, -res.relevance, rtol=1e-5, atol=1e-7)
    words = res.words()
    in_words = sum(float(r) for r, w in zip(res.relevance, res.encoded.words) if w is not None)  # not white space
    assert words and abs(sum(r for _, r, _ in words) - in_words) < 1e-4
    assert all(word.strip() and word in res.encoded.text for word, _, _ in words[:20])
    for word, value, positions in words[:20]:  # a word's relevance is its tokens'
        assert value == pytest.approx(float(res.relevance[positions].sum()), abs=1e-6)
        assert "".join(res.encoded.piece(k) for k in positions).strip() == word
    assert "<span" in res.token_html(merge=True) and len(res.token_html()) > len(res.token_html(merge=True))
    with pytest.raises(TargetError, match="ham"):
        explain_text(mail.text, target="eggs")
