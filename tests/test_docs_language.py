"""Every Python example in docs/language-models.md runs, and says what it claims."""

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parent.parent / "docs" / "language-models.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S)


def test_the_page_has_its_examples():
    assert len(BLOCKS) >= 3


def test_the_examples_run_and_their_comments_hold(capsys):
    pytest.importorskip("transformers")
    import torch

    namespace: dict = {}
    for index, block in enumerate(BLOCKS):  # later blocks use names from earlier ones
        exec(compile(block, f"language-models.md block {index}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "torch.Size([1, 6])" in printed and "torch.Size([1, 11])" in printed
    out, answer, lm = namespace["out"], namespace["answer"], namespace["lm"]
    res = namespace["res"]
    # the last block: embeddings as input, summed over the hidden dimension = the token ids' relevance
    import lrp
    ids_res = lrp.explain(lrp.language.NextToken(lm), namespace["ids"], composite="epsilon")
    torch.testing.assert_close(res.relevance.sum(-1), ids_res.relevance, rtol=1e-4, atol=1e-6)
    assert out.shape == (1, 11) and answer.log_probabilities(out).shape == (1, 5)
