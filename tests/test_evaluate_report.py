"""``report.md`` of ``lrp evaluate``: a verdict computed from the results, and every metric defined with its unit."""

import csv
import re
import subprocess
import sys

import numpy as np
import pytest

from lrp.evaluate.report import verdict


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "out"
    result = subprocess.run([sys.executable, "-m", "lrp.cli", "evaluate", "--model", "mnist", "--limit", "40",
                             "--steps", "5", "--randomisation-samples", "4", "--replace", "blur", "zero",
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return (out / "report.md").read_text(), list(csv.DictReader(open(out / "results.csv")))


def verdict_block(report):
    lines = report.splitlines()
    assert lines[0].startswith("# ")
    body = lines[1:]
    start = next(i for i, line in enumerate(body) if line.strip())
    block = []
    for line in body[start:]:
        if not line.strip():
            break
        block.append(line)
    return block


def test_report_opens_with_a_verdict_that_matches_results_csv(small_run):
    report, rows = small_run
    block = verdict_block(report)
    assert block[0].startswith("**Verdict**") and "in logits" in block[0]
    for replace in ("blur", "zero"):
        aopc = {r["method"]: float(r["aopc_morf"]) for r in rows if r["replace"] == replace}
        line = next(line for line in block if line.startswith(f"- {replace.capitalize()} replacement:"))
        named = re.findall(r"`([^`]+)`", line)
        assert aopc[named[0]] == max(aopc.values()), (line, aopc)  # the best method by MoRF AOPC comes first
        value = float(re.search(r"MoRF AOPC (-?[\d.]+) logits", line).group(1))
        assert value == pytest.approx(aopc[named[0]], abs=0.006)
        baselines = {m: v for m, v in aopc.items() if m in ("gradient", "gradient-x-input", "integrated-gradients",
                                                            "smoothgrad", "occlusion-4")}
        if named[0] not in baselines:  # an LRP composite leads: compared with the best baseline
            assert f"the best baseline, `{max(baselines, key=baselines.get)}`" in line
        assert f"random: {aopc['random']:.2f}" in line
    assert any(line.startswith("- Randomisation check:") and "Spearman" in line for line in block)
    assert any(line.startswith("- Localisation:") and "mass accuracy" in line for line in block)


def test_every_metric_in_the_tables_is_defined_with_its_unit(small_run):
    report, _ = small_run
    headers = set()
    for line in report.splitlines():
        if line.startswith("| method |"):
            headers |= {h.strip() for h in line.strip("|").split("|")} - {"method"}
    assert {"aopc_morf", "abpc", "pointing_game", "mass_accuracy", "rank_accuracy", "spearman", "ssim",
            "relative_l2"} <= headers
    definitions = report.split("## What the numbers mean", 1)[1].split("\n## ", 1)[0]
    for header in headers:
        assert f"`{header}`" in definitions, header
    lines = {h: next(line for line in definitions.splitlines() if f"`{h}`" in line) for h in headers}
    for h in ("aopc_morf", "auc_morf", "abpc"):
        assert "in logits" in lines[h]
    for h in ("pointing_game", "mass_accuracy", "rank_accuracy", "sparseness"):
        assert "in [0, 1]" in lines[h]
    assert "nats" in lines["entropy"] and "milliseconds" in lines["ms_per_sample"]
    assert "**MoRF** / **LeRF**" in definitions


def rows(values, replace="blur"):
    return [{"method": m, "replace": replace, "aopc_morf": v} for m, v in values.items()]


def test_verdict_says_when_a_baseline_wins():
    lines = verdict(rows({"epsilon-plus-flat": 7.0, "lrp0": 7.5, "gradient": 9.0, "smoothgrad": 6.0,
                          "random": 4.0}), inputs=100)
    assert lines[0].startswith("**Verdict** (100 inputs;")
    line = lines[1]
    assert line.startswith("- Blur replacement: a baseline wins: baseline `gradient`")
    assert "MoRF AOPC 9.00 logits vs 7.50 for the best LRP composite, `lrp0` (+1.50)" in line
    assert "random: 4.00" in line


def test_verdict_says_when_the_gap_is_tiny():
    # no per-input numbers: a gap under 2% of the AOPC is small
    line = verdict(rows({"epsilon-plus-flat": 9.00, "gradient": 8.98, "random": 4.0}))[1]
    assert "LRP `epsilon-plus-flat` is ahead by a small margin (0.2%)" in line and "`gradient`" in line
    assert "fastest" not in line
    # per-input AOPC: a lead of 0.3 within two standard errors of the paired difference is noise
    gen = np.random.default_rng(0)
    lrp_aopc = gen.normal(9.3, 3.0, 50)
    gradient_aopc = lrp_aopc - 0.3 + gen.normal(0, 3.0, 50)
    values = {"epsilon-plus-flat": lrp_aopc.mean(), "gradient": gradient_aopc.mean(), "random": 4.0}
    per_sample = {"blur": {"epsilon-plus-flat": lrp_aopc, "gradient": gradient_aopc}}
    line = verdict(rows(values), per_sample=per_sample)[1]
    assert line.startswith("- Blur replacement: no clear winner: LRP `epsilon-plus-flat` leads by less than the noise")
    assert " ± " in line
    # the same lead, consistent over the inputs: clear
    per_sample = {"blur": {"epsilon-plus-flat": lrp_aopc, "gradient": lrp_aopc - 1.0 + gen.normal(0, 0.1, 50)}}
    values["gradient"] = per_sample["blur"]["gradient"].mean()
    line = verdict(rows(values), per_sample=per_sample)[1]
    assert "LRP `epsilon-plus-flat` lowers the explained logit fastest" in line


def test_verdict_near_random_units_and_csv_strings():
    line = verdict(rows({"epsilon-plus-flat": 5.02, "gradient": 4.0, "random": 5.0}))[1]
    assert "no better than chance" in line
    line = verdict(rows({"epsilon-plus-flat": 4.0, "gradient": 3.0, "random": 5.0}))[1]
    assert "no method beats random" in line
    lines = verdict([{"method": "lrp0", "replace": "zero", "aopc_morf": "0.4125"},
                     {"method": "gradient", "replace": "zero", "aopc_morf": "0.2"},
                     {"method": "random", "replace": "zero", "aopc_morf": "0.1"}], score="probability")
    assert "softmax probability" in lines[0] and "logits" not in "".join(lines)
    assert "LRP `lrp0` lowers the explained softmax probability fastest: MoRF AOPC 0.412 (probability)" in lines[1]


def test_verdict_on_randomisation_and_localisation():
    results = [{"method": m, "replace": "blur", "aopc_morf": a, "mass_accuracy": mass, "rank_accuracy": rank,
                "pointing_game": point}
               for m, a, mass, rank, point in [("epsilon-plus-flat", 9.0, 0.6, 0.7, 1.0),
                                               ("gradient", 7.0, 0.8, 0.5, 1.0), ("random", 4.0, 0.1, 0.1, 0.2)]]
    randomisation = [{"method": m, "step": step, "spearman": rho}
                     for m, rhos in (("epsilon-plus-flat", (1.0, 0.4, 0.01)), ("gradient", (1.0, 0.9, 0.8)))
                     for step, rho in enumerate(rhos)]
    lines = verdict(results, randomisation=randomisation)
    random_line = next(line for line in lines if "Randomisation check" in line)
    assert "`epsilon-plus-flat` decorrelate" in random_line and "Spearman 0.01" in random_line
    assert "`gradient` survive it (Spearman 0.80)" in random_line
    local = next(line for line in lines if "Localisation" in line)
    assert "`gradient` puts the largest share" in local and "mass accuracy 0.80" in local
    assert "LRP `epsilon-plus-flat` has the best rank accuracy, 0.70" in local
    assert "reached by 2 of 3 methods" in local
