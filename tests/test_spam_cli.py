"""``lrp explain --model spam``: .txt and .eml files and folders, one HTML heatmap and CSV per mail, summary.csv;
broken files are listed as failed and the others still explained; the README's text lines run."""

from __future__ import annotations

import csv
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrp.cli import main
from lrp.spam import SPAM_MAX_TOKENS, explain_text

README = Path(__file__).resolve().parent.parent / "README.md"

HAM = "Hi Bob,\n\nthe meeting moved to Tuesday at 10. Could you bring the slides for the budget review?\n\nAlice\n"
SPAM_MAIL = ("From: winner@example.com\nTo: you@example.org\nSubject: You WON a FREE prize\n"
             "Content-Type: text/html\n\n<html><body><p>Click <a href='http://x'>here</a> to claim your prize "
             "now! Limited time offer, act now.</p></body></html>\n")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def mails(tmp_path: Path) -> Path:
    folder = tmp_path / "mails"
    (folder / "inbox").mkdir(parents=True)
    (folder / "meeting.txt").write_text(HAM, encoding="utf-8")
    (folder / "inbox" / "prize.eml").write_bytes(SPAM_MAIL.encode("ascii"))
    (folder / "broken.txt").write_bytes(b"\xff\xfe\x00b\x00r\x00")  # UTF-16 with NULs: binary to us
    (folder / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me".encode("latin-1"))  # not UTF-8
    (folder / "empty.txt").write_text("  \n", encoding="utf-8")
    (folder / "unreadable.eml").mkdir()  # a folder named like a mail: not a file, skipped by the search
    (folder / "picture.png").write_bytes(b"\x89PNG\r\n")  # not a text suffix: a folder search skips it
    return folder


def test_a_folder_with_broken_files_explains_the_rest_and_lists_every_file(mails, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["explain", str(mails), str(tmp_path / "missing.txt"), "--model", "spam", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1  # some inputs failed
    rows = {Path(r["input"]).name: r for r in _rows(out / "summary.csv")}
    assert sorted(rows) == ["broken.txt", "empty.txt", "latin1.txt", "meeting.txt", "missing.txt", "prize.eml"]
    assert "no such file" in rows["missing.txt"]["status"]
    assert "binary" in rows["broken.txt"]["status"] and "not UTF-8" in rows["latin1.txt"]["status"]
    assert "empty" in rows["empty.txt"]["status"]
    for name in ("broken.txt", "latin1.txt", "empty.txt"):
        assert name in err
    assert rows["meeting.txt"]["status"] == rows["prize.eml"]["status"] == "ok"
    assert rows["meeting.txt"]["predicted"] == "ham" and rows["prize.eml"]["predicted"] == "spam"
    # without --target the spam model explains spam: one colour code for every mail
    assert rows["meeting.txt"]["explained"] == rows["prize.eml"]["explained"] == "spam"
    assert sorted(p.name for p in out.iterdir()) == ["meeting.csv", "meeting.html", "prize.csv", "prize.html",
                                                     "summary.csv"]
    # the .eml was parsed: the HTML part's text is read, its markup and headers are not
    assert "claim your prize" in rows["prize.eml"]["text"] and "<a" not in rows["prize.eml"]["text"]
    assert "winner@example.com" not in rows["prize.eml"]["text"]


def test_each_mail_gets_a_self_contained_word_heatmap_equal_to_the_python_call(mails, tmp_path):
    out = tmp_path / "out"
    assert main(["explain", str(mails / "inbox" / "prize.eml"), "--model", "spam", "--out", str(out)]) == 0
    page = (out / "prize.html").read_text(encoding="utf-8")
    assert "red: for spam, blue: for ham" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing loaded from elsewhere
    why = explain_text(SPAM_MAIL.encode("ascii").decode("ascii"), target="spam")
    tokens = _rows(out / "prize.csv")
    assert [int(t["token_id"]) for t in tokens] == why.encoded.ids
    relevance = torch.tensor([float(t["relevance"]) for t in tokens])
    torch.testing.assert_close(relevance, why.relevance, rtol=1e-6, atol=1e-7)
    summary = _rows(out / "summary.csv")[0]
    assert float(summary["relevance_sum"]) == pytest.approx(float(why.relevance.sum()), rel=1e-5, abs=1e-6)
    # words by default: one span per word (a word of several tokens is one span), tokens with --no-merge-words
    words = len(why.words())
    spaces = sum(w is None for w in why.encoded.words)  # tokens of white space: a span each (shown as ␣, ↵)
    assert page.count('class="lrp-token"') == words + spaces  # one span per word
    assert main(["explain", str(mails / "inbox" / "prize.eml"), "--model", "spam", "--no-merge-words",
                 "--out", str(tmp_path / "tokens")]) == 0
    by_token = (tmp_path / "tokens" / "prize.html").read_text(encoding="utf-8")
    assert by_token.count('class="lrp-tok') > page.count('class="lrp-tok')


def test_target_ham_flips_the_map_and_text_mails_are_parsed(mails, tmp_path):
    raw = tmp_path / "raw.txt"  # a raw mail saved as .txt: recognised by its headers
    raw.write_text(SPAM_MAIL, encoding="utf-8")
    for target in ("spam", "ham"):
        assert main(["explain", str(raw), "--model", "spam", "--target", target,
                     "--out", str(tmp_path / target)]) == 0
    spam_rows = _rows(tmp_path / "spam" / "raw.csv")
    ham_rows = _rows(tmp_path / "ham" / "raw.csv")
    assert [r["token"] for r in spam_rows] == [r["token"] for r in ham_rows]
    assert all(float(a["relevance"]) == pytest.approx(-float(b["relevance"]), abs=1e-6)
               for a, b in zip(spam_rows, ham_rows))
    assert "red: for ham, blue: for spam" in (tmp_path / "ham" / "raw.html").read_text(encoding="utf-8")
    assert "Content-Type" not in "".join(r["text"] for r in spam_rows)


def test_a_parsed_mail_is_not_parsed_again_and_a_file_named_summary_keeps_its_table(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    # the subject looks like a header: once parsed, the mail must not be read as a mail again
    (folder / "x.eml").write_text("From: a@b.c\nTo: d@e.f\nSubject: Date: Friday - free prize\n\n"
                                  "Claim your free prize now.\n", encoding="utf-8")
    (folder / "summary.txt").write_text("Minutes of the meeting: the budget was agreed.", encoding="utf-8")
    assert main(["explain", str(folder), "--model", "spam", "--out", str(tmp_path / "out")]) == 0
    rows = {Path(r["input"]).name: r for r in _rows(tmp_path / "out" / "summary.csv")}
    assert rows["x.eml"]["text"] == "Date: Friday - free prize Claim your free prize now."
    assert rows["summary.txt"]["outputs"] != "summary"
    tokens = _rows(tmp_path / "out" / f"{rows['summary.txt']['outputs']}.csv")
    assert "".join(t["text"] for t in tokens).startswith("Minutes")


def test_a_long_mail_is_cut_to_what_the_model_reads_and_says_so(tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("Subject: minutes\n\n" + "the committee agreed on the budget for next year. " * 200,
                    encoding="utf-8")
    assert main(["explain", str(long), "--model", "spam", "--out", str(tmp_path / "out")]) == 0
    summary = _rows(tmp_path / "out" / "summary.csv")[0]
    assert summary["truncated"] == "1" and int(summary["tokens"]) == SPAM_MAX_TOKENS
    assert f"reads the first {SPAM_MAX_TOKENS} tokens" in (tmp_path / "out" / "long.html").read_text("utf-8")


@pytest.mark.parametrize("args, message", [
    (["--model", "spam"], "give the texts to explain"),
    (["emptydir", "--model", "spam"], "no .txt or .eml files in emptydir"),
    (["--model", "spam", "--text", "hi", "--classes", "c.txt"], "--classes does not apply to the built-in spam"),
    (["--model", "spam", "--text", "hi", "--target", "eggs"], "ham, spam"),
    (["--model", "spam", "--text", "hi", "--grayscale"], "--grayscale applies to images"),
    (["--model", "mnist", "--text", "hi"], "need a text model: --model spam"),
])
def test_spam_options_used_wrongly_are_one_clear_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emptydir").mkdir()
    code = main(["explain", *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_readme_text_lines_run(tmp_path, mails):
    """The README's ``lrp explain ... --model spam`` lines, as written, on a made-up mails/ folder."""
    block = re.search(r"## Text\n.*?```\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert block is not None
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines() if "--model spam" in line]
    assert len(lines) >= 2
    (tmp_path / "mails").rename(tmp_path / "mails_all")
    (tmp_path / "mails").mkdir()
    (tmp_path / "mails_all" / "meeting.txt").rename(tmp_path / "mails" / "meeting.txt")
    (tmp_path / "mails_all" / "inbox" / "prize.eml").rename(tmp_path / "mails" / "prize.eml")
    for line in lines:
        result = subprocess.run([sys.executable, "-m", "lrp.cli", *shlex.split(line)[1:]], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (line, result.stderr)
    assert {p.name for p in (tmp_path / "why-spam").iterdir()} >= {"meeting.html", "prize.html", "summary.csv"}
    assert (tmp_path / "lrp-out" / "text.html").exists()


def test_readme_evaluate_line_for_spam_writes_a_report_where_lrp_beats_random(tmp_path):
    """``lrp evaluate --model spam`` as the README writes it (40 held-out mails, both removals)."""
    readme = README.read_text(encoding="utf-8")
    lines = [line.split("#")[0].strip() for line in re.findall(r"^lrp evaluate .*--model spam.*$", readme, re.M)]
    assert len(lines) == 1
    result = subprocess.run([sys.executable, "-m", "lrp.cli", *shlex.split(lines[0])[1:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    out = tmp_path / shlex.split(lines[0])[shlex.split(lines[0]).index("--out") + 1]
    rows = _rows(out / "results.csv")
    assert {r["removal"] for r in rows} == {"mask", "delete"}
    by = {(r["method"], r["removal"]): r for r in rows}
    for removal in ("mask", "delete"):
        # the signed maps find what the model uses: MoRF drops the score faster, LeRF slower, than random
        for name in ("epsilon", "gradient-x-input"):
            assert float(by[name, removal]["aopc_morf"]) > float(by["random", removal]["aopc_morf"])
            assert float(by[name, removal]["aopc_lerf"]) < float(by["random", removal]["aopc_lerf"])
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "40 of the 1,190 held-out mails" in report and (out / "curves_mask_morf.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--model", "spam", "--replace", "blur"], "--replace blur is for pixels"),
    (["--model", "spam", "--patch", "4"], "--patch does not apply to --model spam"),
    (["--model", "spam", "--methods", "eggs"], "unknown text method 'eggs'"),
    (["--model", "spam", "--methods", "epsilon", "epsilon-gamma-box"], "token ids have none"),
    (["--model", "mnist", "--replace", "mask"], "--replace mask removes tokens"),
])
def test_evaluate_spam_options_used_wrongly_are_one_clear_line(tmp_path, capsys, args, message):
    code = main(["evaluate", *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_evaluate_spam_with_chosen_methods_and_removal(tmp_path):
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", "spam", "--limit", "4", "--steps", "3", "--replace", "delete",
                 "--methods", "epsilon", "random", "--out", str(out)]) == 0
    rows = _rows(out / "results.csv")
    assert sorted((r["method"], r["removal"]) for r in rows) == [("epsilon", "delete"), ("random", "delete")]
    assert all(float(r["aopc_morf"]) == float(r["aopc_morf"]) for r in rows)  # not NaN
