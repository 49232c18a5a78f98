"""LXT 2.1's relevance for the cases of ``lxt_models.CASES``, computed in an interpreter of its own.

    python lxt_reference.py VARIANT CASES_FILE RESULTS_FILE

LXT works by patching module classes (and BERT's whole modeling module) in place, process-wide and for good,
so it runs here rather than in the test process; test_lxt_agreement.py starts one such interpreter per LXT
variant (attnLRP, cp_LRP), with the LXT overlay (transformers 4.51.3 and LXT) on its PYTHONPATH.
``CASES_FILE`` (torch.save) maps each case of that variant to its model's state dict, input and target; the
results map it to {"relevance", "scores"} or {"error": traceback}. Exit status 3: LXT or transformers 4.51.3
is not importable (message on stderr).
"""

from __future__ import annotations

import importlib
import sys
import traceback
import warnings

import torch

LXT_TRANSFORMERS = "4.51.3"


def _patch_identity(patch):
    return (patch.func, patch.args, tuple(sorted(patch.keywords.items()))) if hasattr(patch, "func") else patch


def main(variant: str, cases_file: str, results_file: str) -> int:
    try:
        import transformers
        from lxt.efficient import monkey_patch
        import lxt.efficient.models  # noqa: F401  (imports every family LXT patches: fails on other transformers)
    except Exception as e:  # noqa: BLE001
        print(f"LXT 2.1 is not importable here: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    if transformers.__version__ != LXT_TRANSFORMERS:
        print(f"LXT 2.1 patches transformers {LXT_TRANSFORMERS}, found {transformers.__version__} at "
              f"{transformers.__file__}", file=sys.stderr)
        return 3
    import lxt_models

    cases = torch.load(cases_file)
    results = {}
    patched: dict = {}  # target -> patch: two cases may share a target only with the same patch
    for name, case in cases.items():  # in order: the ViT's patches (torch.nn.GELU, ...) go last
        try:
            family = lxt_models.CASES[name][0]
            module = "vit_torch" if family == "vit" else family
            patch_map = getattr(importlib.import_module(f"lxt.efficient.models.{module}"), variant)
            todo = {}
            for target, patch in patch_map.items():
                if target in patched:
                    if _patch_identity(patched[target]) != _patch_identity(patch):
                        raise RuntimeError(f"{target} is patched already, differently: run {name} in an "
                                           f"interpreter of its own")
                else:
                    todo[target] = patch
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                monkey_patch(lxt_models.modeling(family), todo)
            patched.update(todo)
            model = lxt_models.build(family)  # after patching: BERT's classes are LXT's now
            model.load_state_dict(case["state"])
            x = case["input"]
            if family == "vit":
                leaf = x.clone().requires_grad_(True)
                out = lxt_models.scores(model, leaf)
            else:
                leaf = model.get_input_embeddings()(x).detach().requires_grad_(True)
                out = lxt_models.scores(model, embeds=leaf)
            out.gather(1, case["target"][:, None]).sum().backward()
            relevance = (leaf * leaf.grad).detach()
            if family != "vit":
                relevance = relevance.sum(-1)  # per token
            results[name] = {"relevance": relevance, "scores": out.detach()}
        except Exception:  # noqa: BLE001
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, results_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
