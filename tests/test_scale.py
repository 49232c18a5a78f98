"""lrp explain --store zarr: a dataset into one Zarr store, under torchrun, killed and resumed, with bad inputs."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lrp
import lrp.cli

zarr = pytest.importorskip("zarr")

DIGITS = 2000
BATCH = 64


def run(*args, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "lrp", "explain", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def run_here(*args, cwd, capsys, monkeypatch):
    """``lrp explain ARGS`` in this process (no interpreter start-up): (exit status, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    status = lrp.cli.main(["explain", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def relevance(out: Path) -> np.ndarray:
    return zarr.open_array(out / "explanations.zarr" / "relevance", mode="r")[:]


def index(out: Path) -> list[dict]:
    with open(out / "index.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """2,000 MNIST test digits as PNGs (sorted names = index order) and lrp.explain's results on them."""
    folder = tmp_path_factory.mktemp("digits")
    x, _ = lrp.models.mnist_digits("test", limit=DIGITS)
    pixels = (x[:, 0].numpy() * 255).round().astype("uint8")
    for i in range(DIGITS):
        Image.fromarray(pixels[i]).save(folder / f"{i:05d}.png")
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0)[:, None]  # what the PNGs hold
    model = lrp.models.mnist()
    parts = [lrp.explain(model, x[s:s + BATCH]) for s in range(0, DIGITS, BATCH)]  # the runs' batches
    return {"folder": folder, "x": x, "relevance": torch.cat([p.relevance for p in parts]).numpy(),
            "target": torch.cat([p.target for p in parts]).numpy(),
            "score": torch.cat([p.start.sum(1) for p in parts]).detach().numpy()}


def assert_matches(out: Path, digits: dict, rows: slice, rtol=1e-5, atol=1e-6):
    got = relevance(out)
    np.testing.assert_allclose(got, digits["relevance"][rows], rtol=rtol, atol=atol)
    table = index(out)
    assert [int(r["target"]) for r in table] == [int(r["prediction"]) for r in table] \
        == digits["target"][rows].tolist()
    np.testing.assert_allclose([float(r["score"]) for r in table], digits["score"][rows], rtol=1e-5)


@pytest.fixture(scope="module")
def small(digits, tmp_path_factory):
    """An uninterrupted single-process run over the first 256 digits (4 chunks of 64), given as a --list."""
    work = tmp_path_factory.mktemp("small")
    listing = work / "inputs.txt"
    listing.write_text("".join(f"{digits['folder']}/{i:05d}.png\n" for i in range(256)))
    result = run("--list", str(listing), "--store", "zarr", "--out", "out", "--batch-size", str(BATCH),
                 "--chunk", "64", "--workers", "1", cwd=work)
    assert result.returncode == 0, result.stderr
    return {"work": work, "list": listing, "out": work / "out", "stdout": result.stdout}


def test_single_process_store_equals_explain(small, digits):
    assert_matches(small["out"], digits, slice(0, 256))
    table = index(small["out"])
    assert list(table[0]) == ["row", "path", "status", "target", "prediction", "score"]
    assert [r["path"] for r in table] == [f"{digits['folder']}/{i:05d}.png" for i in range(256)]
    assert {r["status"] for r in table} == {"ok"} and [int(r["row"]) for r in table] == list(range(256))
    store = zarr.open_array(small["out"] / "explanations.zarr" / "relevance", mode="r")
    assert store.dtype == np.float32 and store.chunks == (64, 1, 28, 28) and store.shape == (256, 1, 28, 28)
    assert "4 chunks written, 0 were done already" in small["stdout"]


def test_torchrun_two_ranks_equal_explain(digits, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lrp",
               "explain", str(digits["folder"]), "--store", "zarr", "--out", "out", "--batch-size", str(BATCH),
               "--chunk", "128", "--workers", "1"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    # torchrun gives each rank one thread (the reference ran with two): sums run in another order, so the
    # relevance agrees to float32 rounding (one digit of the 2,000 differs by up to 4e-6), not bit for bit
    assert_matches(out, digits, slice(0, DIGITS), rtol=1e-4, atol=1e-5)
    assert [Path(r["path"]).name for r in index(out)] == [f"{i:05d}.png" for i in range(DIGITS)]
    # chunks alternate between the two ranks (each process marks its own with its run id)
    runs = [json.loads(p.read_text())["run"] for p in sorted((out / "progress").glob("chunk-*.json"))]
    assert len(runs) == 16 and len(set(runs)) == 2 and set(runs[0::2]) == {runs[0]} and set(runs[1::2]) == {runs[1]}
    assert "explained 2000 of 2000 inputs" in result.stdout


def chunk_state(out: Path) -> dict:
    """Each chunk file's modification time and each marker's contents."""
    files = {p.relative_to(out): p.stat().st_mtime_ns for p in (out / "explanations.zarr").rglob("c/*/0/0/0")}
    markers = {p.name: p.read_text() for p in (out / "progress").glob("chunk-*.json")}
    return {"files": files, "markers": markers}


def test_resume_after_a_crash_mid_chunk(small):
    work = small["work"]
    common = ["--list", str(small["list"]), "--store", "zarr", "--out", "crashed", "--batch-size", str(BATCH),
              "--chunk", "64", "--workers", "1"]
    killed = run(*common, cwd=work, env={"LRP_SCALE_CRASH_AFTER": "2"})  # dies writing the third chunk
    assert killed.returncode == 137, killed.stderr
    before = chunk_state(work / "crashed")
    assert len(before["markers"]) == 2 and len(before["files"]) == 3  # a half-written third chunk, not done
    resumed = run(*common, "--resume", cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert "2 chunks written, 2 were done already" in resumed.stdout
    after = chunk_state(work / "crashed")
    for name, text in before["markers"].items():  # the finished chunks were not redone
        assert after["markers"][name] == text
    done_files = sorted(before["files"])[:2]
    assert all(after["files"][f] == before["files"][f] for f in done_files)
    np.testing.assert_array_equal(relevance(work / "crashed"), relevance(small["out"]))
    assert (work / "crashed" / "index.csv").read_text() == (small["out"] / "index.csv").read_text()


def test_resume_after_sigkill(small):
    work, out = small["work"], small["work"] / "killed"
    common = ["--list", str(small["list"]), "--store", "zarr", "--out", "killed", "--batch-size", str(BATCH),
              "--chunk", "64", "--workers", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "lrp", "explain", *common], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "progress").glob("chunk-*.json"))) < 1:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list((out / "progress").glob("chunk-*.json")))
    assert 1 <= done < 4, f"{done} chunks were done when the run was killed"
    resumed = run(*common, "--resume", cwd=work)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{4 - done} chunks written, {done} were done already" in resumed.stdout
    np.testing.assert_array_equal(relevance(out), relevance(small["out"]))


def test_resume_refuses_other_options(small, capsys, monkeypatch):
    work = small["work"]
    (work / "net.py").write_text("import lrp\n\ndef make():\n    return lrp.models.mnist(pretrained=False)\n")
    common = ["--list", str(small["list"]), "--store", "zarr", "--out", "out", "--resume"]
    here = dict(cwd=work, capsys=capsys, monkeypatch=monkeypatch)
    status, _, err = run_here(*common, "--model", "net.py:make", **here)
    assert status == 2 and '--model: the store has "mnist", this run "net.py:make"' in err
    status, _, err = run_here(*common, "--composite", "epsilon-gamma-box", **here)
    assert status == 2 and '--composite: the store has "epsilon-plus-flat", this run "epsilon-gamma-box"' in err
    status, _, err = run_here(*common, "--dtype", "float16", **here)
    assert status == 2 and "--dtype" in err
    status, _, err = run_here(*common[:-1], **here)
    assert status == 2 and "give --resume" in err
    status, _, err = run_here(str(small["list"]), "--resume", **here)
    assert status == 2 and "--resume applies to --store zarr" in err
    assert "4 chunks written" in small["stdout"] and len(list((small["out"] / "progress").iterdir())) == 4


def test_corrupt_file_listed_in_errors_rest_written(digits, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(40):
        (folder / f"{i:05d}.png").write_bytes((digits["folder"] / f"{i:05d}.png").read_bytes())
    (folder / "00007.png").write_bytes(b"\x89PNG broken")  # row 7
    status, out, _ = run_here(str(folder), "--store", "zarr", "--out", "out", "--batch-size", str(BATCH),
                              "--workers", "1", cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert status == 1 and "1 failed (see errors.csv)" in out
    with open(tmp_path / "out" / "errors.csv", newline="") as f:
        errors = list(csv.DictReader(f))
    assert [(e["row"], Path(e["path"]).name) for e in errors] == [("7", "00007.png")]
    assert "not a readable image" in errors[0]["error"]
    table = index(tmp_path / "out")
    assert table[7]["status"] == "failed" and table[7]["target"] == "" and len(table) == 40
    got = relevance(tmp_path / "out")
    assert np.isnan(got[7]).all()
    ok = [i for i in range(40) if i != 7]
    np.testing.assert_allclose(got[ok], digits["relevance"][ok], rtol=1e-4, atol=1e-5)


def test_webdataset_shards_equal_folder(digits, tmp_path, capsys, monkeypatch):
    wds = pytest.importorskip("webdataset")
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = 0
    for s in range(2):
        with wds.TarWriter(str(shards / f"shard-{s:06d}.tar")) as sink:
            for i in range(s * 48, (s + 1) * 48):
                sink.write({"__key__": f"sample{i:05d}", "png": (digits["folder"] / f"{i:05d}.png").read_bytes(),
                            "cls": str(int(digits["target"][i]))})
                rows += 1
            sink.write({"__key__": "labelonly", "cls": "0"})  # no image: left out with a note
    status, _, err = run_here(str(shards), "--store", "zarr", "--out", "out", "--batch-size", str(BATCH),
                              "--workers", "1", cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert status == 0, err
    assert "2 shard samples hold no image" in err
    table = index(tmp_path / "out")
    assert table[0]["path"] == f"{shards}/shard-000000.tar[sample00000.png]" and len(table) == rows == 96
    np.testing.assert_allclose(relevance(tmp_path / "out"), digits["relevance"][:96], rtol=1e-4, atol=1e-5)


def test_arrays_float16_and_pngs(digits, tmp_path, capsys, monkeypatch):
    np.save(tmp_path / "batch.npy", digits["x"][:32].numpy())
    status, _, err = run_here("batch.npy", "--store", "zarr", "--out", "out", "--dtype", "float16", "--png",
                              "--workers", "0", "--batch-size", str(BATCH), cwd=tmp_path, capsys=capsys,
                              monkeypatch=monkeypatch)
    assert status == 0, err
    store = zarr.open_array(tmp_path / "out" / "explanations.zarr" / "relevance", mode="r")
    assert store.dtype == np.float16 and store.shape == (32, 1, 28, 28)
    expected = digits["relevance"][:32]
    np.testing.assert_allclose(store[:].astype(np.float32), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    assert [r["path"] for r in index(tmp_path / "out")][:2] == ["batch.npy[0]", "batch.npy[1]"]
    assert sorted(p.name for p in (tmp_path / "out" / "png").iterdir())[:2] == ["00000000_heatmap.png",
                                                                                "00000001_heatmap.png"]


def errors_csv(out: Path) -> dict[int, str]:
    with open(out / "errors.csv", newline="") as f:
        return {int(e["row"]): e["error"] for e in csv.DictReader(f)}


def test_chunk_of_failed_rows_only(digits, tmp_path, capsys, monkeypatch):
    """A chunk whose every row fails is all NaN, Zarr's fill value: it is written all the same, and marked done."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(30):
        data = b"broken" if 10 <= i < 20 else (digits["folder"] / f"{i:05d}.png").read_bytes()
        (folder / f"{i:05d}.png").write_bytes(data)
    common = [str(folder), "--store", "zarr", "--out", "out", "--batch-size", "10", "--chunk", "10", "--workers", "0"]
    here = dict(cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    status, out, err = run_here(*common, **here)
    assert status == 1 and "explained 20 of 30 inputs" in out and "10 failed (see errors.csv)" in out, err
    errors = errors_csv(tmp_path / "out")
    assert sorted(errors) == list(range(10, 20)) and all("not a readable image" in e for e in errors.values())
    got = relevance(tmp_path / "out")
    assert np.isnan(got[10:20]).all() and not np.isnan(got[:10]).any() and not np.isnan(got[20:]).any()
    assert (tmp_path / "out" / "explanations.zarr" / "relevance" / "c" / "1" / "0" / "0" / "0").is_file()
    assert [r["status"] for r in index(tmp_path / "out")] == ["ok"] * 10 + ["failed"] * 10 + ["ok"] * 10
    status, out, err = run_here(*common, "--resume", **here)  # nothing left to do
    assert status == 1 and "0 chunks written, 3 were done already" in out, err
    assert errors_csv(tmp_path / "out") == errors


def test_overflowing_relevance_fails_its_row(digits, tmp_path, capsys, monkeypatch):
    """Relevance that is not finite, or that float16 cannot hold, fails the row instead of being stored."""
    x = digits["x"][:6].numpy().copy()
    x[2] *= 3e38  # finite inputs on which the model overflows
    x[3] *= 1e8  # relevance of about 1e6, beyond float16's 65504
    np.save(tmp_path / "x.npy", x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, out, err = run_here("x.npy", "--store", "zarr", "--out", "out", "--dtype", "float16", "--workers",
                                    "0", cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    assert status == 1 and "explained 4 of 6 inputs" in out, err
    assert errors_csv(tmp_path / "out") == {2: "relevance not finite (the model overflowed)",
                                            3: "relevance exceeds float16's range (65504): use --dtype float32"}
    table = index(tmp_path / "out")
    assert [r["status"] for r in table] == ["ok", "ok", "failed", "failed", "ok", "ok"]
    assert table[2]["score"] == "" and all(np.isfinite(float(table[i]["score"])) for i in (0, 1, 4, 5))
    got = relevance(tmp_path / "out")
    assert np.isnan(got[2:4]).all() and np.isfinite(got[[0, 1, 4, 5]]).all()


def test_unusable_array_files_are_rows_in_errors(digits, tmp_path, capsys, monkeypatch):
    """An array file of a shape the model does not read, or not readable, is one failed row; a sample with NaN in
    an .npz fails alone, with that reason."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        (folder / f"{i:05d}.png").write_bytes((digits["folder"] / f"{i:05d}.png").read_bytes())
    np.save(folder / "wrong.npy", np.zeros((5, 3, 32, 32), np.float32))
    (folder / "broken.npy").write_bytes(b"not numpy")
    x = digits["x"][:4].numpy().copy()
    x[3, 0, 5, 5] = np.nan
    np.savez(folder / "nan_one.npz", x=x)
    here = dict(cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    status, out, err = run_here(str(folder), "--store", "zarr", "--out", "out", "--workers", "0", **here)
    assert status == 1 and "explained 5 of 8 inputs" in out, err
    paths = [Path(r["path"]).name for r in index(tmp_path / "out")]
    assert paths == ["00000.png", "00001.png", "broken.npy", "nan_one.npz[0]", "nan_one.npz[1]", "nan_one.npz[2]",
                     "nan_one.npz[3]", "wrong.npy"]
    errors = errors_csv(tmp_path / "out")
    assert sorted(errors) == [2, 6, 7]
    assert "broken.npy: not a readable NumPy file" in errors[2]
    assert errors[6].endswith("nan_one.npz[3]: the sample holds values that are not finite (NaN or infinity)")
    assert "wrong.npy: an array of shape (5, 3, 32, 32) does not fit model 'mnist'" in errors[7]
    got = relevance(tmp_path / "out")
    np.testing.assert_allclose(got[3:6], digits["relevance"][:3], rtol=1e-4, atol=1e-5)
    (tmp_path / "afile").write_text("")
    status, _, err = run_here("in/00000.png", "--store", "zarr", "--out", "afile/out", **here)
    assert status == 2 and "--out afile/out: afile is a file; give a folder" in err
