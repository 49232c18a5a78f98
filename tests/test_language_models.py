"""Language-model plumbing (issue 13): token ids re-indexed before the embedding, and Hugging Face's
``Conv1D`` (``addmm``) as a dense layer; tiny random Hugging Face models explained without registration."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrp

from architectures import LastToken

V, E, T = 50, 8, 7


class TokenNet(nn.Module):
    """embedding -> relu(fc) -> mean over tokens -> fc; ``ids_as`` says how the ids reach the embedding."""

    def __init__(self, ids_as: str = "ids", conv1d: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc1, self.fc2 = nn.Embedding(V, E), nn.Linear(E, E), nn.Linear(E, 3)
        self.ids_as, self.conv1d = ids_as, conv1d

    def forward(self, ids):
        if self.ids_as == "view":  # GPT-2 / OPT: input_ids.view(-1, input_shape[-1])
            ids = ids.view(-1, ids.shape[-1])
        elif self.ids_as == "flat":
            ids = ids.reshape(-1).long().reshape(ids.shape)
        elif self.ids_as == "tail":  # the first token is left out
            ids = ids[:, 1:]
        h = self.emb(ids)
        if self.conv1d:  # Hugging Face's Conv1D: bias + x @ W with W = fc1.weight.T
            flat = h.reshape(-1, E)
            h = torch.addmm(self.fc1.bias, flat, self.fc1.weight.t().contiguous()).reshape(h.shape)
        else:
            h = self.fc1(h)
        return self.fc2(F.relu(h).mean(1))


def _ids(n: int = 3) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("ids_as", ["view", "flat"])
def test_token_ids_reshaped_before_the_embedding_are_still_the_input(ids_as):
    model, ref = TokenNet(ids_as).double().eval(), TokenNet().double().eval()
    res = lrp.explain(model, _ids(), composite="epsilon")
    torch.testing.assert_close(res.relevance, lrp.explain(ref, _ids(), composite="epsilon").relevance)


def test_a_token_left_out_gets_no_relevance_and_the_others_keep_theirs():
    ids = _ids()
    res = lrp.explain(TokenNet("tail").double().eval(), ids, composite="epsilon")
    assert res.relevance.shape == ids.shape
    assert torch.equal(res.relevance[:, 0], torch.zeros(3, dtype=res.relevance.dtype))
    ref = lrp.explain(TokenNet().double().eval(), ids[:, 1:], composite="epsilon")
    torch.testing.assert_close(res.relevance[:, 1:], ref.relevance)


def test_ids_used_for_something_else_are_not_the_input():
    class PositionsToo(TokenNet):
        def forward(self, ids):
            positions = torch.arange(ids.shape[1]).expand_as(ids)  # not built from the ids: no input
            return self.fc2(F.relu(self.fc1(self.emb(ids) + self.emb(positions))).mean(1))

    res = lrp.explain(PositionsToo().double().eval(), _ids(), composite="epsilon")
    assert res.relevance.shape == (3, T) and torch.isfinite(res.relevance).all()


@pytest.mark.parametrize("composite", ["epsilon", "epsilon-plus", "epsilon-alpha2-beta1"])
def test_addmm_is_the_dense_layer_it_computes(composite):
    conv1d = lrp.explain(TokenNet(conv1d=True).double().eval(), _ids(), composite=composite)
    linear = lrp.explain(TokenNet().double().eval(), _ids(), composite=composite)
    torch.testing.assert_close(conv1d.relevance, linear.relevance, rtol=1e-10, atol=1e-12)


def test_opt_reads_its_ids_through_a_view():
    transformers = pytest.importorskip("transformers")
    config = transformers.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(0)
    model = LastToken(transformers.OPTForCausalLM(config)).double().eval()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    res = lrp.explain(model, ids, composite="epsilon")
    assert res.relevance.shape == ids.shape and torch.isfinite(res.relevance).all()
    assert (res.relevance != 0).all()


def test_addcmul_of_two_activations_is_an_error():
    class Squares(nn.Module):
        def forward(self, x):
            return torch.addcmul(x, x, x).sum(-1, keepdim=True)

    with pytest.raises(lrp.UnsupportedOperationError, match="addcmul"):
        lrp.explain(Squares(), torch.randn(2, 3))


class Remapped(nn.Module):
    """Ids remapped by a table, or changed one by one, before the embedding; a second embedding of them."""

    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.emb2 = nn.Embedding(V, E), nn.Embedding(V, E)
        self.fc = nn.Linear(E, 2, bias=False)
        self.register_buffer("table", torch.randperm(V))
        self.how = how

    def forward(self, ids):
        if self.how == "table":
            h = self.emb(self.table[ids])
        elif self.how == "table given":  # the same, with the remapped ids as the input
            h = self.emb(ids)
        elif self.how == "masked second embedding":
            h = self.emb(ids) + self.emb2(ids.masked_fill(ids > 40, 0))
        elif self.how == "clamped second embedding":
            h = self.emb(ids) + self.emb2(ids.clamp(max=40))
        elif self.how == "zeroed copy":
            h = self.emb(ids) + self.emb2(ids.clone().zero_())
        elif self.how == "zeros like":
            h = self.emb(ids) + self.emb2(torch.zeros_like(ids))
        else:  # "sum of two ids": no position to give it
            h = self.emb((ids + ids.flip(1)) % V)
        return self.fc(h.mean(1))


def test_ids_read_through_a_table_keep_their_positions():
    model, ids = Remapped("table").double().eval(), _ids()
    res = lrp.explain(model, ids, target=0, composite="lrp0")
    ref = lrp.explain(Remapped("table given").double().eval(), model.table[ids], target=0, composite="lrp0")
    torch.testing.assert_close(res.relevance, ref.relevance)


@pytest.mark.parametrize("how", ["masked second embedding", "clamped second embedding"])
def test_ids_changed_one_by_one_stay_the_input(how):
    # bias-free, LRP-0: every bit of relevance reaches some token (conservation), none is lost to a constant
    res = lrp.explain(Remapped(how).double().eval(), _ids(), target=0, composite="lrp0")
    torch.testing.assert_close(res.conservation["input"], torch.ones(3, dtype=torch.float64))


def test_a_zeroed_copy_of_the_ids_is_a_constant_like_zeros_like():
    ids = _ids()
    zeroed = lrp.explain(Remapped("zeroed copy").double().eval(), ids, target=0, composite="lrp0")
    zeros = lrp.explain(Remapped("zeros like").double().eval(), ids, target=0, composite="lrp0")
    torch.testing.assert_close(zeroed.relevance, zeros.relevance)


def test_ids_combined_with_each_other_are_refused():
    with pytest.raises(lrp.UnsupportedOperationError, match="computed from the token ids"):
        lrp.explain(Remapped("sum of two ids").double().eval(), _ids(), target=0)


def _llama(tie: bool = False):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double().eval()


def test_next_token_reads_the_logits_after_the_last_token():
    lm = _llama()
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    ours = lrp.explain(lrp.language.NextToken(lm), ids, composite="epsilon")
    ref = lrp.explain(LastToken(lm), ids, composite="epsilon")
    torch.testing.assert_close(ours.relevance, ref.relevance, rtol=0, atol=0)
    assert torch.equal(ours.target, lm(ids).logits[:, -1].argmax(-1))


def test_a_generated_continuation_is_the_sum_of_its_tokens_explanations():
    # the continuation's score is the sum of the generated tokens' logits (the log-likelihood with each
    # position's normaliser held fixed): its relevance is the sum of the explanations of each token from the
    # tokens before it, read off the same sequence
    lm = _llama()
    prompt = torch.randint(0, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    out = lm.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    cont = lrp.language.Continuation(lm, prompt.shape[1])
    res = lrp.explain(cont, out, composite="epsilon")
    assert res.relevance.shape == out.shape
    logits = lm(out).logits
    picked = logits[:, 4:-1].gather(-1, out[:, 5:, None]).squeeze(-1)
    torch.testing.assert_close(res.output, picked.sum(-1))
    total = sum(lrp.explain(lrp.language.NextToken(lm, 4 + t), out, target=out[:, 5 + t],
                            composite="epsilon").relevance for t in range(3))
    torch.testing.assert_close(res.relevance, total, rtol=1e-7, atol=1e-9)
    logp = cont.log_probabilities(out)
    torch.testing.assert_close(logp, torch.log_softmax(logits[:, 4:-1], -1).gather(-1, out[:, 5:, None])[..., 0])
    # the continuation's last token predicts nothing: it gets no relevance
    assert (res.relevance[:, -1] == 0).all() and (res.relevance[:, :-1] != 0).all()


def test_a_continuation_leaves_padding_out():
    lm = _llama()
    prompt = torch.randint(1, 100, (1, 5), generator=torch.Generator().manual_seed(1))
    out = lm.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    padded = out.clone()
    padded[:, -1] = 0  # the sequence ended one token earlier; 0 pads it
    ours = lrp.explain(lrp.language.Continuation(lm, 5, pad_token_id=0), padded, composite="epsilon")
    short = lrp.explain(lrp.language.Continuation(lm, 5), padded[:, :-1], composite="epsilon")
    torch.testing.assert_close(ours.relevance[:, :-1], short.relevance, rtol=1e-7, atol=1e-9)


def test_a_continuation_from_embeddings_gives_the_token_ids_relevance_summed():
    lm = _llama(tie=True)
    prompt = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(1))
    out = lm.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)
    ids_res = lrp.explain(lrp.language.Continuation(lm, 5), out, composite="epsilon")
    embeds = lm.get_input_embeddings()(out).detach()
    emb_res = lrp.explain(lrp.language.Continuation(lm, 5, tokens=out[:, 5:]), embeds, composite="epsilon")
    torch.testing.assert_close(emb_res.relevance.sum(-1), ids_res.relevance, rtol=1e-7, atol=1e-9)


def test_a_continuation_needs_one():
    lm = _llama()
    ids = torch.randint(0, 100, (1, 5))
    with pytest.raises(lrp.LRPError, match="no continuation"):
        lrp.explain(lrp.language.Continuation(lm, 5), ids)
    with pytest.raises(lrp.LRPError, match="tokens="):
        lrp.explain(lrp.language.Continuation(lm, 3), torch.randn(1, 5, 32, dtype=torch.float64))
