"""benchmarks/gpu_record.sh: the steps it runs, their time limits and the record it leaves (8 files at most). The
script is tested, not the benchmarks: a stand-in for Python records what it is asked to run and answers at once."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_record.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="gpu_record.sh needs bash and coreutils' timeout")

# the stand-in: `-c CODE` (the summary's line on the machine) prints a line; `-m pytest` (the lane) outlasts any
# limit below; a benchmark script refuses with exit 2 and one line, as the real ones do without CUDA
STAND_IN = """#!/usr/bin/env bash
echo "$PWD :: $*" >> "$CALLS"
case $1 in
    -c) echo "python stand-in" ;;
    -m) sleep 30 ;;
    *) echo "$(basename "$1"): --device cuda: no CUDA device"; exit 2 ;;
esac
"""


def _record(tmp_path: Path, *steps: str, **env: str) -> subprocess.CompletedProcess:
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "rec"), *steps], capture_output=True, text=True,
                          timeout=60, cwd="/",  # run from elsewhere: the script finds the repository by itself
                          env={**os.environ, "PYTHON": str(python), "CALLS": str(tmp_path / "calls"), **env})


def test_an_unknown_step_is_refused_before_anything_runs(tmp_path):
    result = _record(tmp_path, "speed", "sped")
    assert result.returncode == 2
    assert "unknown step 'sped'" in result.stderr and "lane speed autocast" in result.stderr
    assert not (tmp_path / "rec").exists() and not (tmp_path / "calls").exists()


def test_each_step_leaves_its_log_and_a_summary_line(tmp_path):
    result = _record(tmp_path, "speed", "lane", "compile", LIMIT_LANE="1")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "rec"
    summary = (out / "summary.txt").read_text().splitlines()
    assert "device cuda" in summary[0] and "python stand-in" in summary
    steps = {line.split(":")[0]: line for line in summary if line.startswith(("speed:", "lane:", "compile:"))}
    assert list(steps) == ["speed", "lane", "compile"]
    for name, script in [("speed", "speed.py"), ("compile", "compile_replay.py")]:
        # the benchmark refused (exit 2) with its own line, which the summary repeats
        assert "exit 2 (failed)" in steps[name] and f"{script}: --device cuda: no CUDA device" in steps[name]
    assert "stopped at its limit of 1s" in steps["lane"]
    assert sorted(p.name for p in out.iterdir()) == ["compile.log", "lane.log", "speed.log", "summary.txt"]
    # each step ran from the repository's root, with the options of a GPU run
    root = SCRIPT.parent.parent
    calls = (tmp_path / "calls").read_text().splitlines()
    assert all(line.startswith(f"{root} :: ") for line in calls)
    assert any("benchmarks/speed.py --device cuda --quick" in line for line in calls)
    assert any("-m pytest -m device" in line for line in calls)


def test_all_steps_fit_the_file_limit(tmp_path):
    """The default run: seven steps, one log each and the summary, eight files (what a device run brings back)."""
    result = _record(tmp_path, LIMIT_LANE="1")
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "rec").iterdir())
    assert names == sorted(["summary.txt"] + [f"{s}.log" for s in
                                              ("lane", "speed", "autocast", "llm", "video", "scale", "compile")])
