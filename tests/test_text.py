"""Text from the command line and in Python: ``lrp explain --model hf:DIR --text ...`` on tiny checkpoints built
here (a byte-level BPE tokenizer trained on a few sentences, a random Llama and a random BERT classifier); the
token heatmap of ``lrp.token_html``."""

import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lrp
from architectures import LastToken
from lrp.cli import main
from lrp.visualize import token_style, token_words

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "unbelievable things happen every day",
             "the quick brown fox jumps over the lazy dog", "<script>alert(1)</script> is not a word"]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=330, special_tokens=["<s>", "</s>", "<unk>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoint folders as save_pretrained writes them: "llama" (causal LM) and "bert" (3 classes)."""
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=3))
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=3, num_labels=3, id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()}))
    for name, model in (("llama", llama), ("bert", bert)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def _rows(path):
    return list(csv.DictReader(open(path, encoding="utf-8")))


def _reference(folder, kind, ids, target=None):
    """lrp.explain on the checkpoint, loaded and wrapped independently of lrp's text pipeline."""
    if kind == "causal-lm":
        model = LastToken(transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True))
    else:
        class Logits(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, ids):
                return self.m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

        model = Logits(transformers.AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True))
    return lrp.explain(model.eval(), torch.tensor([ids]), target=target, composite="epsilon")


def test_cli_writes_token_heatmap_and_csv_that_match_the_python_api(checkpoints, tmp_path):
    """A user's run: a subprocess, a causal LM explained at its predicted next token."""
    text = "the cat sat on the <script>mat"
    result = subprocess.run([sys.executable, "-m", "lrp.cli", "explain", "--model", f"hf:{checkpoints / 'llama'}",
                             "--text", text, "--out", "out"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "explained 1 of 1 texts into out/" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.csv", "text.csv", "text.html"]

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoints / "llama", local_files_only=True)
    ids = tokenizer(text)["input_ids"]
    rows = _rows(tmp_path / "out" / "text.csv")
    assert [int(r["token_id"]) for r in rows] == ids
    assert [r["token"] for r in rows] == tokenizer.convert_ids_to_tokens(ids)
    assert [int(r["position"]) for r in rows] == list(range(len(ids)))
    assert rows[0]["special"] == "1" and rows[0]["word"] == "" and rows[0]["token"] == "<s>"
    # words are what lies between spaces: "<script>mat" is the 6th word, however many pieces it has
    assert [r["word"] for r in rows if r["text"].strip() in ("<", "mat")] == ["5", "5"]
    expected = _reference(checkpoints / "llama", "causal-lm", ids)
    relevance = torch.tensor([float(r["relevance"]) for r in rows])
    torch.testing.assert_close(relevance, expected.relevance[0], rtol=1e-5, atol=1e-7)
    assert relevance.sum() == pytest.approx(float(expected.relevance.sum()), rel=1e-5, abs=1e-6)

    summary = _rows(tmp_path / "out" / "summary.csv")[0]
    predicted = int(expected.output[0].argmax())
    assert summary["status"] == "ok" and summary["explained"] == summary["predicted"]
    assert summary["explained"] == repr(tokenizer.decode([predicted]))
    assert float(summary["score"]) == pytest.approx(float(expected.output[0, predicted]), rel=1e-4)
    assert int(summary["tokens"]) == len(ids) and summary["outputs"] == "text"

    page = (tmp_path / "out" / "text.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page  # the text's "<script>" is escaped
    assert "&lt;" in page and page.count('class="lrp-token"') == len(ids) - 1
    assert page.count('class="lrp-special"') == 1


def test_classifier_with_a_label_name_and_words_merged(checkpoints, tmp_path, capsys):
    folder = checkpoints / "bert"
    text = "unbelievable things happen, the cat sat"
    code = main(["explain", "--model", f"hf:{folder}", "--text", text, "--target", "positive", "--merge-words",
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    summary = _rows(tmp_path / "out" / "summary.csv")[0]
    assert summary["explained"] == "positive" and summary["predicted"] in LABELS.values()
    rows = _rows(tmp_path / "out" / "text.csv")
    ids = [int(r["token_id"]) for r in rows]
    expected = _reference(folder, "classifier", ids, target=2)
    relevance = torch.tensor([float(r["relevance"]) for r in rows])
    torch.testing.assert_close(relevance, expected.relevance[0], rtol=1e-5, atol=1e-9)
    # the page shows one span per word (and the special token), each the sum of its pieces
    page = (tmp_path / "out" / "text.html").read_text(encoding="utf-8")
    shown = [float(v) for v in re.findall(r'class="lrp-token" data-relevance="([^"]+)"', page)]
    words: dict = {}
    for r in rows:
        if r["word"]:
            words[int(r["word"])] = words.get(int(r["word"]), 0.0) + float(r["relevance"])
    assert len(shown) == len(words) == len(text.split()) < len(ids) - 1
    assert shown == pytest.approx([words[k] for k in sorted(words)], rel=1e-6, abs=1e-12)
    assert ">unbelievable</span>" in page and ">happen,</span>" in page


def test_token_html_renders_subword_pieces_merges_words_and_escapes():
    byte_level = ["<s>", "un", "bel", "ievable", "Ġ<", "script", ">", "Ċ", "Ġcaf", "Ã", "©"]  # é: two bytes
    r = torch.arange(1.0, 12.0)
    assert token_style(byte_level) == "byte"
    assert token_words(byte_level, special=["<s>"]) == [None, 0, 0, 0, 1, 1, 1, None, 2, 2, 2]
    pieces = lrp.token_html(byte_level, r, special=["<s>"])
    assert pieces.count("<span") == 11 and "<script" not in pieces and "&lt;" in pieces
    shown = re.findall(r">([^<]*)</span>", pieces)  # the pieces' text; the vocabulary's pieces are on hover
    assert shown == ["&lt;s&gt;", "un", "bel", "ievable", "&lt;", "script", "&gt;", "\u21b5", "caf", "\ufffd",
                     "\ufffd"]  # half a character each
    assert "ievable</span> <span" in pieces and "\u21b5</span>\n <span" in pieces  # "Ġ": a space, "Ċ": a newline
    merged = lrp.token_html(byte_level, r, special=["<s>"], merge=True)
    values = [float(v) for v in re.findall(r'data-relevance="([^"]+)"', merged)]
    assert values == [1.0, 2 + 3 + 4, 5 + 6 + 7, 8.0, 9 + 10 + 11]  # <s>, unbelievable, <script>, newline, café
    assert ">unbelievable</span>" in merged and ">&lt;script&gt;</span>" in merged and ">café</span>" in merged

    wordpiece = ["[CLS]", "un", "##believ", "##able", "things", "[SEP]"]
    merged = lrp.token_html(wordpiece, torch.ones(6), special=[True, False, False, False, False, True], merge=True)
    assert re.findall(r">([^<]+)</span>", merged) == ["[CLS]", "unbelievable", "things", "[SEP]"]
    sentencepiece = ["<s>", "\u2581Hello", "\u2581wor", "ld", "<0x0A>"]
    assert re.findall(r">([^<]+)</span>", lrp.token_html(sentencepiece, torch.ones(5), merge=True, special=["<s>"])) \
        == ["&lt;s&gt;", "Hello", "world", "\u21b5"]
    # words given (e.g. from offsets) win over the marks; the old call still works as it did
    given = lrp.token_html(["New", "York", "is"], torch.ones(3), words=[0, 0, 1], merge=True)
    assert re.findall(r">([^<]+)</span>", given) == ["NewYork", "is"]
    old = lrp.token_html(["the", "<cat>", "sat"], torch.tensor([0.5, -1.0, 0.0]), "bwr", vmax=1.0)
    assert old.count("<span") == 3 and "&lt;cat&gt;" in old and "rgb(0, 0, 255)" in old
    with pytest.raises(ValueError, match="give one value per token"):
        lrp.token_html(["a", "b"], torch.ones(3))


def _broken(checkpoints, tmp_path, what):
    folder = tmp_path / what
    if what == "missing":
        return folder
    shutil.copytree(checkpoints / "bert", folder)
    if what == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)  # transformers 5 writes no special_tokens_map.json
    else:  # a masked language model
        config = json.loads((folder / "config.json").read_text())
        config["architectures"] = ["BertForMaskedLM"]
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("what, messages", [
    ("missing", ["no folder", "save_pretrained", "lrp downloads nothing"]),
    ("no-tokenizer", ["holds no tokenizer", "tokenizer.save_pretrained("]),
    ("masked", ["BertForMaskedLM", "masked language model", "...ForSequenceClassification"]),
])
def test_a_checkpoint_that_cannot_be_used_is_exit_2_with_the_way_out_and_nothing_written(
        checkpoints, tmp_path, capsys, what, messages):
    folder = _broken(checkpoints, tmp_path, what)
    code = main(["explain", "--model", f"hf:{folder}", "--text", "hello", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("lrp: error: ")
    assert all(m in err for m in messages), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--model", "mnist", "--text", "hi"], "need a text model: --model spam"),
    (["--model", "hf:{llama}", "--text", "hi", "--size", "64"], "--size applies to images and arrays"),
    (["--model", "hf:{llama}"], "give the texts to explain"),
    (["--model", "hf:{llama}", "--text", "hi", "--composite", "epsilon-gamma-box"], "token ids have none"),
    (["--model", "hf:{llama}", "--text", "hi", "--target", "cat mat sat"], "is 3 tokens for this tokenizer"),
    (["--model", "hf:{llama}", "--text", "hi", "--target", "100000"], "token id 100000 is out of range"),
    (["--model", "hf:{bert}", "--text", "hi", "--target", "happy"], "neither a class index nor one of the 3"),
    (["--model", "hf:{llama}", "--text-file", "nothing.txt"], "--text-file nothing.txt: no such file"),
])
def test_text_options_used_wrongly_are_one_clear_line(checkpoints, tmp_path, capsys, args, message):
    args = [a.format(llama=checkpoints / "llama", bert=checkpoints / "bert") for a in args]
    code = main(["explain", *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_text_file_one_text_per_line_a_text_too_long_fails_alone(checkpoints, tmp_path, capsys):
    lines = ["the cat sat on the mat", "", "a dog ran in the park", " ".join(["the quick brown fox"] * 20),
             "every day"]
    (tmp_path / "reviews.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code = main(["explain", "--model", f"hf:{checkpoints / 'llama'}", "--text-file", str(tmp_path / "reviews.txt"),
                 "--target", " mat", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 1
    assert "reviews.txt:4:" in captured.err and "reads at most 64" in captured.err
    assert "explained 3 of 4 texts" in captured.out and "1 failed" in captured.out
    summary = _rows(tmp_path / "out" / "summary.csv")
    assert [(Path(r["input"]).name, r["status"].split(":")[0], r["outputs"]) for r in summary] == [
        ("reviews.txt:1", "ok", "reviews_1"), ("reviews.txt:3", "ok", "reviews_3"),
        ("reviews.txt:4", "failed", ""), ("reviews.txt:5", "ok", "reviews_5")]
    assert {r["explained"] for r in summary if r["status"] == "ok"} == {"' mat'"}
    assert sorted(p.name for p in (tmp_path / "out").glob("reviews_*")) == [
        f"reviews_{k}.{ext}" for k in (1, 3, 5) for ext in ("csv", "html")]


def test_python_api_and_a_progress_bar_that_follows_the_layers(checkpoints):
    from lrp.pipeline.text import TextPipeline, _LayerProgress

    pipeline = TextPipeline.load(f"hf:{checkpoints / 'llama'}")
    assert pipeline.kind == "causal-lm" and pipeline.target("Ġmat") == pipeline.target(" mat")
    out = io.StringIO()
    outcome = pipeline.explain("the cat sat on the mat", target=" mat", progress=True, file=out)
    assert outcome.explained == "' mat'" and outcome.relevance.shape == (len(outcome.encoded),)
    assert "4/4" in out.getvalue()  # 2 layers: forward and back
    expected = _reference(checkpoints / "llama", "causal-lm", outcome.encoded.ids, target=outcome.target)
    torch.testing.assert_close(outcome.relevance, expected.relevance[0], rtol=1e-5, atol=1e-7)
    # the bar moves because the work is done: one step as each layer's forward ends, one as relevance leaves it
    ids = torch.tensor([outcome.encoded.ids])
    with _LayerProgress(pipeline.model, ids.shape[1], True, io.StringIO()) as progress:
        lrp.explain(pipeline.model, ids, composite="epsilon")
        assert progress.seen == 4
    page = outcome.html(merge=True)
    assert page.startswith("<!DOCTYPE html>") and "next token" in page


def test_the_python_example_in_docs_text_md_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (Path(__file__).parent.parent / "docs" / "text.md").read_text(), re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/text.md", "exec"), namespace)
    assert namespace["outcome"].explained == "' the'"
    spam = namespace["spam"]  # the spam model's example: no biases, so the relevance sums to the logit
    assert spam.explained == "spam" and abs(float(spam.relevance.sum()) - spam.score) < 1e-4 * abs(spam.score) + 1e-5
    assert (tmp_path / "why.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
