"""The models tests/lxt_agreement compares lrp with LXT 2.1 on: tiny random float64 models, built the same way by the
test (with the venv's transformers, 5.x) and by ``lxt_reference.py`` (with LXT's transformers, 4.51.3).

A case is one model explained under one LXT patch map; ``CASES`` maps its name to
``(family, LXT variant, lrp attention rule)``. The variants are LXT's ``attnLRP`` (AttnLRP) and ``cp_LRP``
(CP-LRP) patch maps.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn as nn

VOCAB, BATCH, TOKENS = 100, 2, 10

_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.2)

# family: (transformers model folder, config class, model class, config arguments); initializer_range 0.2
# (not 0.02) puts the activations, attention scores and logits of these tiny models at order one
FAMILIES = {
    "llama": ("llama", "LlamaConfig", "LlamaForCausalLM", _DECODER),
    "qwen2": ("qwen2", "Qwen2Config", "Qwen2ForCausalLM", _DECODER),
    # layer 0 attends through a sliding window of 4 tokens, layer 1 to all; (1 + weight) RMSNorms, q/k norms,
    # scaled embeddings, tanh GELU
    "gemma3": ("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(_DECODER, sliding_window=4, sliding_window_pattern=2, query_pre_attn_scalar=8)),
    # Conv1D (addmm), hand-written tanh GELU, LayerNorm, learned positions
    "gpt2": ("gpt2", "GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2)),
    # a classifier: the pooler's tanh and the classification head on top of the encoder
    "bert": ("bert", "BertConfig", "BertForSequenceClassification",
             dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, num_labels=3, initializer_range=0.2)),
}

# case: (family or "vit", LXT patch map, lrp's attention rule). LXT's CP-LRP for the gated MLPs of Llama, Qwen2
# and Gemma3 also holds the gate fixed, where lrp's attention="cp" keeps the uniform rule at the gate's product:
# the rules differ there, so those families are compared under AttnLRP only.
CASES = {
    "llama": ("llama", "attnLRP", "attnlrp"),
    "qwen2": ("qwen2", "attnLRP", "attnlrp"),
    "gemma3": ("gemma3", "attnLRP", "attnlrp"),
    "gpt2": ("gpt2", "attnLRP", "attnlrp"),
    "bert": ("bert", "attnLRP", "attnlrp"),
    "gpt2-cp": ("gpt2", "cp_LRP", "cp"),
    "vit-cp": ("vit", "cp_LRP", "cp"),  # torchvision's VisionTransformer
}


def modeling(family: str):
    """The module that defines the family's model classes (the one LXT patches)."""
    if family == "vit":
        from torchvision.models import vision_transformer
        return vision_transformer
    folder = FAMILIES[family][0]
    return importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")


def build(family: str, seed: int = 0) -> nn.Module:
    """The family's tiny model, float64, eval mode, eager attention. Its class is looked up in
    ``modeling(family)`` when called, so that a model built after LXT patched that module gets LXT's classes
    (LXT replaces BERT's classes instead of patching them)."""
    torch.manual_seed(seed)
    if family == "vit":
        model = modeling("vit").VisionTransformer(32, 8, 2, 2, 16, 32, num_classes=5).double().eval()
        nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero
        return model
    import transformers

    _, config_name, model_name, kwargs = FAMILIES[family]
    config = getattr(transformers, config_name)(**kwargs)
    config._attn_implementation = "eager"
    config.use_cache = False
    model = getattr(modeling(family), model_name)(config).double().eval()
    with torch.no_grad():  # normalisation weights and biases away from their initial ones and zeros
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.add_(0.1 * torch.randn_like(p))
    return model


def model_input(family: str, seed: int = 1) -> torch.Tensor:
    """Token ids (batch, tokens), or images for the ViT."""
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return torch.randn(BATCH, 3, 32, 32, generator=g, dtype=torch.float64)
    return torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g)


def scores(model: nn.Module, x=None, embeds=None) -> torch.Tensor:
    """(batch, classes): a causal LM's next-token logits at the last token, a classifier's logits."""
    if not hasattr(model, "config"):  # the ViT
        return model(x)
    out = model(input_ids=x, inputs_embeds=embeds).logits
    return out[:, -1] if out.ndim == 3 else out


class Scores(nn.Module):
    """``scores`` as a module, for lrp.explain."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return scores(self.model, x)
