"""Agreement with LXT 2.1 (Achtibat et al.'s reference implementation of AttnLRP and CP-LRP) on Llama, Qwen2,
Gemma3, GPT-2, BERT and torchvision's ViT: tiny random float64 models, relevance per token (per pixel for the
ViT), relative L2 distance at most 1e-4.

The rules match with lrp's ``lrp0`` composite: LXT's efficient implementation is gradient x input with the
gradient changed at the non-linear ops (identity rule at activations, uniform rule at products and at the
attention's matrix products, normalisations linearised with their variance held fixed) and left as it is at
linear maps, which makes it LRP-0 there (the bias in the denominator, no epsilon). Measured: 2e-9 to 1.4e-7
(lrp0); lrp's ``epsilon`` composite (epsilon = 1e-6) differs from LXT by 1.5e-5 to 3e-4 on these models.

LXT 2.1 patches transformers 4.51.3 and does not run with transformers 5, which the venv has (what lrp is
tested with). It runs in its own interpreter (lxt_reference.py) with the LXT overlay on its PYTHONPATH:
transformers 4.51.3 and LXT, put in .venv/lxt-overlay by ``make test`` (``make lxt-overlay``;
tests/lxt_agreement/requirements.txt); ``LRP_LXT_OVERLAY`` names another folder. The models are built here, with the venv's
transformers, and their weights handed over, so this also checks that both transformers versions compute the
same scores, and lrp is compared with LXT on the transformers that users have. Without the overlay (and without
LXT and transformers 4.51.3 in the venv itself) the tests are skipped.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lrp

from lxt_models import CASES, Scores, build, model_input, scores

HERE = Path(__file__).resolve().parent
OVERLAY = Path(os.environ.get("LRP_LXT_OVERLAY") or HERE.parents[1] / ".venv" / "lxt-overlay")
# relative L2 distance allowed (the 1e-4; the ViT's comparison had 1e-6). LXT computes its identity rule
# as y / (x + 1e-10), and Llama's and Qwen2's RMSNorms compute in float32 also in float64 models
TOLERANCE = {"vit-cp": 1e-6}
DEFAULT_TOLERANCE = 1e-4
SKIP = "LXT 2.1 with transformers 4.51.3 not found in {where}; `make lxt-overlay` installs them in .venv/lxt-overlay"


def _lxt_env() -> dict:
    """The environment of LXT's interpreters: the LXT overlay ahead on PYTHONPATH; skips when there is no LXT."""
    env = dict(os.environ)
    if OVERLAY.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(OVERLAY), env.get("PYTHONPATH")) if p)
        return env
    try:  # the venv itself may hold LXT and transformers 4.51.3
        importlib.metadata.distribution("lxt")  # not `import lxt`: tests/lxt_agreement is on sys.path (tests/conftest.py)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(SKIP.format(where=f"the venv, and there is no LXT overlay {OVERLAY}"))
    return env


def _run_lxt(env: dict, tmp: Path, cases: dict) -> dict:
    """LXT's results for ``cases``, one interpreter per LXT variant (both at once)."""
    runs = []
    for variant in sorted({CASES[name][1] for name in cases}):
        mine = {name: case for name, case in cases.items() if CASES[name][1] == variant}
        files = tmp / f"{variant}-cases.pt", tmp / f"{variant}-results.pt"
        torch.save(mine, files[0])
        proc = subprocess.Popen([sys.executable, str(HERE / "lxt_reference.py"), variant, *map(str, files)],
                                cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs.append((variant, proc, files[1]))
    results = {}
    try:
        for variant, proc, out in runs:
            stdout, stderr = proc.communicate(timeout=900)
            if proc.returncode == 3:  # an overlay that is there but broken fails; none at all skips
                if OVERLAY.is_dir():
                    pytest.fail(f"the LXT overlay {OVERLAY} does not work: {stderr.strip()}\n"
                                f"(rebuild it: rm -rf {OVERLAY}; make lxt-overlay)")
                pytest.skip(SKIP.format(where=f"the venv ({stderr.strip()}), and there is no LXT overlay {OVERLAY}"))
            if proc.returncode != 0:
                pytest.fail(f"the LXT reference run ({variant}) failed:\n{stdout}\n{stderr}")
            results.update(torch.load(out))
    finally:  # on a skip, failure or timeout: no interpreter left running
        for _, proc, _ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """case -> (model, input, target, LXT's result), for every case at once."""
    pytest.importorskip("transformers")
    env = _lxt_env()
    models, cases = {}, {}
    for name, (family, _, _) in CASES.items():
        model, x = build(family), model_input(family)
        with torch.no_grad():
            target = scores(model, x).argmax(1)
        models[name] = model, x, target
        cases[name] = {"state": model.state_dict(), "input": x, "target": target}
    results = _run_lxt(env, tmp_path_factory.mktemp("lxt"), cases)
    return {name: (*models[name], results[name]) for name in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_agrees_with_lxt(case, reference):
    model, x, target, theirs = reference[case]
    assert "error" not in theirs, f"LXT failed on {case}:\n{theirs['error']}"
    # the same weights give the same scores under the venv's transformers and LXT's 4.51.3
    with torch.no_grad():
        torch.testing.assert_close(scores(model, x), theirs["scores"], rtol=1e-9, atol=1e-12)
    attention = CASES[case][2]
    ours = lrp.explain(Scores(model), x, target=target, composite=lrp.composite("lrp0", attention=attention))
    assert ours.relevance.shape == theirs["relevance"].shape
    distance = float((ours.relevance - theirs["relevance"]).norm() / theirs["relevance"].norm())
    assert distance <= TOLERANCE.get(case, DEFAULT_TOLERANCE), distance
