"""`lrp video`: generated clips in, videos out; each output frame checked against lrp.explain on its input frame."""

import os
import re
import shlex
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import lrp

av = pytest.importorskip("av", reason="lrp video needs PyAV: pip install 'lrp[video]' (make setup installs it)")

from lrp.cli import main  # noqa: E402
from lrp.pipeline import Pipeline  # noqa: E402
from lrp.pipeline.inputs import Preprocess  # noqa: E402
from lrp.video import VideoError, VideoReader, VideoWriter, explain_video, seen_box  # noqa: E402

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
SCALE = 4  # the digit clips: each MNIST pixel a 4x4 block of a 112x112 frame


def write_clip(path, frames, rate=25, codec="libx264", pts=None, time_base=None, audio=False, options=None):
    """Encode RGB frames (N, H, W, 3) uint8; ``pts`` in ``time_base`` for variable frame rates; ``options``: the
    container's (e.g. MP4's movflags)."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "pal8" if codec == "gif" else "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "12"}
        if time_base is not None:
            stream.codec_context.time_base = time_base
        sound = container.add_stream("aac", rate=8000) if audio else None
        for i, array in enumerate(frames):
            if codec == "gif":
                image = Image.fromarray(array).quantize(256)
                palette = np.zeros((256, 4), np.uint8)
                colours = np.asarray(image.getpalette(), np.uint8).reshape(-1, 3)[:256]
                palette[:, 0], palette[:len(colours), 1:] = 255, colours
                frame = av.VideoFrame.from_ndarray((np.asarray(image), palette), format="pal8")
            else:
                frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None:
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            samples.sample_rate, samples.pts = 8000, 0
            for packet in [*sound.encode(samples), *sound.encode()]:
                container.mux(packet)


def read_clip(path):
    """(frames (N, H, W, 3) uint8, [frame times in s], average rate) as PyAV decodes them."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        return (np.stack([f.to_ndarray(format="rgb24") for f in frames]), [float(f.time) for f in frames],
                stream.average_rate)


def digit_frames(n, start=0):
    """MNIST test digits, white on black, each pixel a SCALE x SCALE block."""
    x, _ = lrp.models.mnist_digits("test", limit=start + n)
    digits = (x[start:, 0].numpy() * 255).round().astype(np.uint8)
    big = digits.repeat(SCALE, 1).repeat(SCALE, 2)
    return np.repeat(big[..., None], 3, -1)


def mnist_input(frame):
    """The built-in model's preprocessing, written out: grayscale, shorter side resized to 28, pixels in [0, 1]."""
    gray = Image.fromarray(frame).convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255.0)[None, None]


@pytest.fixture(scope="module")
def model():
    return lrp.models.mnist()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """12 digits at 25 frames/s, and the frames as decoded."""
    path = tmp_path_factory.mktemp("clip") / "digits.mp4"
    write_clip(path, digit_frames(12))
    return path, read_clip(path)


def expected_heatmaps(model, frames):
    """lrp.heatmap(lrp.explain(model, frame)) for each frame, at the relevance's 28x28: (N, 28, 28, 3)."""
    return np.stack([np.asarray(lrp.heatmap(lrp.explain(model, mnist_input(f)).relevance[0]), dtype=np.float64)
                     for f in frames])


def block_colours(panel):
    """The colour in the middle of each SCALE x SCALE block (the 2x2 centre pixels' mean): (28, 28, 3)."""
    h, w = panel.shape[0] // SCALE, panel.shape[1] // SCALE
    blocks = panel[:h * SCALE, :w * SCALE].reshape(h, SCALE, w, SCALE, 3).astype(np.float64)
    return blocks[:, 1:3, :, 1:3].mean((1, 3))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "lrp.cli", *args], capture_output=True, text=True, timeout=300)


def run_main(capsys, *args):
    """The command in this process (faster than a subprocess): (exit status, stdout, stderr)."""
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# --------------------------------------------------------------------------- frames, rate, size, heatmaps

def test_side_by_side_frames_are_lrp_explain(clip, model, tmp_path):
    path, (frames, times, rate) = clip
    out = tmp_path / "out" / "explained.mp4"  # a folder that does not exist yet is made
    result = cli("video", str(path), "--model", "mnist", "--layout", "side-by-side", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert re.search(r"wrote .*explained\.mp4: 12 frames, 224x112 at 25 frames/s \(libx264\); [\d.]+ frames/s",
                     result.stdout), result.stdout
    written, written_times, written_rate = read_clip(out)
    assert written.shape == (12, 112, 224, 3)  # the frame, and the heatmap next to it
    assert written_times == pytest.approx(times) and written_rate == rate == 25
    assert np.abs(written[:, :, :112].astype(int) - frames).mean() < 2  # the frame as it was
    expected = expected_heatmaps(model, frames)
    got = np.stack([block_colours(panel) for panel in written[:, :, 112:]])
    errors = np.abs(got - expected).mean((1, 2, 3))
    assert errors.max() < 4, errors  # H.264 loses a little
    wrong = np.abs(got - np.roll(expected, 1, 0)).mean((1, 2, 3))  # the neighbour's heatmap
    assert (wrong > 3 * errors).all(), (errors, wrong)
    assert [p.name for p in out.parent.iterdir()] == ["explained.mp4"]  # the temporary file was renamed


def test_overlay_is_the_heatmap_over_the_frame(clip, model, tmp_path, capsys):
    path, (frames, times, rate) = clip
    out = tmp_path / "overlay.mp4"
    status, stdout, _ = run_main(capsys, "video", str(path), "--out", str(out), "--batch-size", "5")
    assert status == 0 and "12 frames, 112x112" in stdout
    written, written_times, _ = read_clip(out)
    assert written.shape == frames.shape and written_times == pytest.approx(times)
    # the documented overlay, written out: relevance / max |relevance|, t = sign * sqrt|.|, weight 0.75 |t|, colour
    # and weight resized bilinearly onto the frame, over the frame's gray lifted into [0.3, 0.9]
    def overlay(frame, relevance):
        t = relevance / relevance.abs().max()
        t = t.sign() * t.abs().sqrt()
        colour = torch.from_numpy(lrp.visualize.colorize(t.numpy())).double() / 255  # bwr
        weight = 0.75 * t.abs()
        layers = torch.cat([colour.permute(2, 0, 1) * weight, weight[None]])[None]
        layers = F.interpolate(layers, size=frame.shape[:2], mode="bilinear", align_corners=False)[0]
        base = 0.3 + 0.6 * frame.astype(np.float64).mean(-1) / 255
        return base[..., None] * (1 - layers[3, ..., None].numpy()) + layers[:3].permute(1, 2, 0).numpy()

    relevance = [lrp.explain(model, mnist_input(frame)).relevance[0, 0].double() for frame in frames]
    for i, (frame, shown) in enumerate(zip(frames, written)):
        error = np.abs(shown / 255 - overlay(frame, relevance[i])).mean()
        assert error < 0.015, i  # H.264 loses a little
        assert np.abs(shown / 255 - overlay(frame, relevance[i - 1])).mean() > 2 * error, i  # not another heatmap


def test_every_holds_the_heatmap_until_the_next_explained_frame(clip, model, tmp_path, capsys):
    path, (frames, _, _) = clip
    out = tmp_path / "every.mp4"
    # frames 0, 3, 6, 9 explained, two per batch: the hold crosses batches
    status, stdout, _ = run_main(capsys, "video", str(path), "--layout", "side-by-side", "--every", "3",
                                 "--batch-size", "2", "--out", str(out))
    assert status == 0 and "12 frames, 4 of them explained" in stdout
    written = read_clip(out)[0]
    assert len(written) == 12
    expected = expected_heatmaps(model, frames)
    got = np.stack([block_colours(panel) for panel in written[:, :, 112:]])
    for i in range(12):
        key = i - i % 3
        error = np.abs(got[i] - expected[key]).mean()
        assert error < 4, i
        if i != key:
            assert np.abs(got[i] - expected[i]).mean() > 3 * error, i  # not its own heatmap
    assert np.abs(written[:, :, :112].astype(int) - frames).mean() < 2  # each frame still its own


def test_variable_frame_rate_gif_odd_size_and_formats(model, tmp_path, capsys):
    """A GIF with uneven delays and an odd size: timestamps and size kept in GIF and WebM; H.264 (even sizes only)
    gets an edge pixel, with a note; the sound of an mp4 is dropped, with a note."""
    frames = np.pad(digit_frames(6, start=20), ((0, 0), (0, 3), (0, 1), (0, 0)))  # 113x115: odd both ways
    stamps = [0, 10, 15, 40, 41, 70]
    gif = tmp_path / "uneven.gif"
    write_clip(gif, frames, codec="gif", rate=Fraction(100, 14), pts=stamps, time_base=Fraction(1, 100))
    _, times, _ = read_clip(gif)
    assert times == pytest.approx([s / 100 for s in stamps])
    for suffix, size in ((".gif", (113, 115)), (".webm", (113, 115)), (".mp4", (114, 116))):
        out = tmp_path / f"out{suffix}"
        status, stdout, stderr = run_main(capsys, "video", str(gif), "--out", str(out))
        assert status == 0, stderr
        written, written_times, _ = read_clip(out)
        assert len(written) == 6 and (written.shape[2], written.shape[1]) == size, suffix
        assert written_times == pytest.approx(times, abs=1e-3), suffix
        assert ("stores even frame sizes only" in stderr) == (suffix == ".mp4")
    noisy = (np.random.default_rng(0).random((4, 64, 96, 3)) * 255).astype(np.uint8)
    with_sound = tmp_path / "sound.mp4"
    write_clip(with_sound, noisy, audio=True)
    status, _, stderr = run_main(capsys, "video", str(with_sound), "--crop", "28", "--out", str(tmp_path / "s.avi"))
    assert status == 0 and "has sound: the output has none" in stderr
    assert "the model sees the centre 64x64 of each 96x64 frame" in stderr  # resized to 42x28, cropped to 28x28
    assert len(read_clip(tmp_path / "s.avi")[0]) == 4


def test_avi_keeps_an_unusual_average_rate(tmp_path, capsys):
    """A phone-like clip at about 24 frames/s whose frame steps jitter (average rate 450000/18751, more than MPEG-4
    part 2's time base can hold as is): the AVI keeps its duration and rate, each frame within half a frame of its
    time, and the summary gives the rate."""
    steps = [3751, 3749, 3760, 3740, 3750, 3751, 3749, 3800, 3700, 3753] * 3
    pts = [int(v) for v in np.cumsum([0] + steps)[:30]]
    path = tmp_path / "phone.mp4"
    write_clip(path, digit_frames(30), rate=24, pts=pts, time_base=Fraction(1, 90000))
    _, times, rate = read_clip(path)
    assert (1 / Fraction(rate)).denominator >= 1 << 16 and 23.99 < rate < 24.01
    out = tmp_path / "phone.avi"
    status, stdout, stderr = run_main(capsys, "video", str(path), "--out", str(out))
    assert status == 0, stderr
    assert re.search(r"30 frames, 112x112 at 23\.999 frames/s \(mpeg4\)", stdout), stdout
    assert "AVI cannot keep" not in stderr  # jitter is not a variable frame rate
    written, written_times, written_rate = read_clip(out)
    frame = 1 / float(rate)
    assert len(written) == 30 and float(written_rate) == pytest.approx(float(rate), rel=1e-5)
    assert np.abs(np.subtract(written_times, times)).max() < frame / 2
    assert written_times[-1] + 1 / float(written_rate) == pytest.approx(times[-1] + frame, abs=frame / 10)


def test_variable_frame_rate_avi_is_constant_with_a_note(tmp_path, capsys):
    """AVI stores a constant rate: a variable-rate WebM keeps its frame count and its duration (the average rate
    its timestamps give, frames / their time, not the 25 frames/s its header names), and a note says the timing is
    lost and which formats keep it; the MP4 keeps the timestamps, and its summary gives the same average rate."""
    stamps = [0, 40, 80, 200, 240, 500, 540, 580]  # ms: 8 frames in 0.62 s
    path = tmp_path / "vfr.webm"
    write_clip(path, digit_frames(8), codec="libvpx-vp9", pts=stamps, time_base=Fraction(1, 1000))
    _, times, rate = read_clip(path)
    assert rate == 25 and times == pytest.approx([t / 1000 for t in stamps])
    status, stdout, stderr = run_main(capsys, "video", str(path), "--out", str(tmp_path / "vfr.avi"))
    assert status == 0, stderr
    average = Fraction(8 * 1000, 620)  # 8 frames from 0 to 0.62 s (the last one's end: one mean step after it)
    constant = np.arange(8) / float(average)
    shift = np.abs(constant - np.array(stamps) / 1000).max()
    assert (f"note: AVI cannot keep variable frame timing: {tmp_path}/vfr.avi plays at a constant 12.903 frames/s "
            f"(the average rate {path} gives), so some frames show up to {shift:.2f} s away from their time in "
            f"{path}; write .mp4, .mkv or .webm to keep the timing") in stderr
    written, written_times, written_rate = read_clip(tmp_path / "vfr.avi")
    assert len(written) == 8 and float(written_rate) == pytest.approx(float(average), rel=1e-5)
    assert written_times == pytest.approx(constant, abs=1e-3)
    status, stdout, stderr = run_main(capsys, "video", str(path), "--out", str(tmp_path / "vfr.mp4"))
    assert status == 0 and "AVI cannot keep" not in stderr
    written, written_times, written_rate = read_clip(tmp_path / "vfr.mp4")
    assert written_times == pytest.approx(times, abs=1e-3) and written_rate == Fraction(8 * 1000, 620)
    assert "8 frames, 112x112 at 12.903 frames/s (libx264)" in stdout


def test_display_rotation_is_applied(tmp_path, capsys):
    """A phone video stored sideways with a display rotation: the model and the output see it upright."""
    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip(f"PyAV {av.__version__} cannot write a display rotation (PyAV 18 can)")
    frames = np.zeros((3, 48, 64, 3), np.uint8)
    frames[:, :8, :8] = 255  # a white corner, top left as stored
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(90)  # shown turned 90 degrees counterclockwise
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = tmp_path / "upright.mp4"
    status, _, stderr = run_main(capsys, "video", str(path), "--layout", "side-by-side", "--crop", "28",
                                 "--out", str(out))
    assert status == 0 and "is shown turned by 90 degrees" in stderr
    written = read_clip(out)[0]
    assert written.shape == (3, 64, 96, 3)  # 48x64 upright, twice as wide
    frame = written[0, :, :48].astype(int)
    assert frame[-8:, :8].mean() > 200 and frame[:8, :8].mean() < 50  # the corner went to the bottom left


# --------------------------------------------------------------------------- errors

def no_leftovers(folder):
    return not any(p.name.endswith(".partial") for p in Path(folder).rglob("*"))


@pytest.mark.parametrize("case", ["broken", "missing", "unknown codec", "cut", "folder"])
def test_unreadable_video_exits_2_with_one_line(case, clip, tmp_path, capsys):
    source = tmp_path / "in.mp4"
    if case == "broken":
        source.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
        message = "in.mp4: not a readable video (Invalid data found when processing input)"
    elif case == "missing":
        message = "in.mp4: no such file"
    elif case == "unknown codec":  # an AVI whose codec tag no decoder knows
        source = tmp_path / "in.avi"
        write_clip(source, digit_frames(3), codec="mpeg4")
        source.write_bytes(source.read_bytes().replace(b"FMP4", b"ZZZZ"))
        message = "in.avi: unknown video codec: the FFmpeg bundled with PyAV"
    elif case == "cut":  # the index (at the end) is missing
        data = clip[0].read_bytes()
        source.write_bytes(data[:len(data) // 2])
        message = "in.mp4: not a readable video"
    else:
        source.mkdir()
        message = "in.mp4: is a folder"
    out = tmp_path / "out" / "x.mp4"
    status, stdout, stderr = run_main(capsys, "video", str(source), "--out", str(out))
    assert status == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lrp: error: ") and message in lines[0], stderr
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize("kind", ["webm", "mp4 faststart"])
def test_video_cut_short_gives_the_frames_read_with_a_note(kind, tmp_path, capsys):
    """A file cut at 60% whose header states the whole length (WebM: its duration; MP4 with the index in front: its
    frame count): the frames that could be read are written (exit 0), and stderr and the summary say the input
    ends early. The whole file gives no such note."""
    frames = (np.random.default_rng(0).random((40, 64, 64, 3)) * 255).astype(np.uint8)
    whole = tmp_path / ("whole.webm" if kind == "webm" else "whole.mp4")
    if kind == "webm":
        write_clip(whole, frames, codec="libvpx-vp9")
    else:
        write_clip(whole, frames, options={"movflags": "+faststart"})
    data = whole.read_bytes()
    cut = tmp_path / f"cut{whole.suffix}"
    cut.write_bytes(data[:int(len(data) * 0.6)])
    status, stdout, stderr = run_main(capsys, "video", str(whole), "--out", str(tmp_path / "whole_lrp.mp4"))
    assert status == 0 and "ends early" not in stderr + stdout and "40 frames" in stdout
    out = tmp_path / "cut_lrp.mp4"
    status, stdout, stderr = run_main(capsys, "video", str(cut), "--out", str(out))
    assert status == 0, stderr
    read = len(read_clip(out)[0])
    assert 5 < read < 40
    assert (f"note: {cut} ends early: {read} frames read, the file says about 40 (it may be cut short); the output "
            f"has the {read} frames read") in stderr
    assert f"{read} frames (the input ends early: its file states about 40)" in stdout


def test_output_that_is_the_input_stops_before_the_model_loads(clip, tmp_path, capsys):
    path = tmp_path / "in.mp4"
    path.write_bytes(clip[0].read_bytes())
    link = tmp_path / "link.mp4"
    link.symlink_to(path)
    for out in (path, link):  # no such model: the output is checked first
        status, _, stderr = run_main(capsys, "video", str(path), "--model", "no_such_model", "--out", str(out))
        assert status == 2 and stderr.strip() == f"lrp: error: {out}: is the input video; give another output name"
    assert path.read_bytes() == clip[0].read_bytes()


def test_paths_the_system_refuses_give_one_line(clip, tmp_path, capsys, monkeypatch):
    """OSErrors (a name too long, a rename that fails) end in one line, exit 2, and no partial file."""
    long = tmp_path / ("x" * 300 + ".mp4")
    status, _, stderr = run_main(capsys, "video", str(clip[0]), "--out", str(long))
    assert status == 2 and len(stderr.strip().splitlines()) == 1
    assert stderr.startswith(f"lrp: error: cannot write {long} (File name too long)")
    status, _, stderr = run_main(capsys, "video", str(long), "--out", str(tmp_path / "o.mp4"))
    assert status == 2 and stderr.strip() == f"lrp: error: {long}: cannot be read (File name too long)"

    def refuse(source, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(lrp.video.os, "replace", refuse)
    status, _, stderr = run_main(capsys, "video", str(clip[0]), "--out", str(tmp_path / "o.mp4"))
    assert status == 2
    assert stderr.strip() == f"lrp: error: cannot write {tmp_path}/o.mp4 (Permission denied); choose another output"
    assert list(tmp_path.iterdir()) == []


def test_output_that_cannot_be_written(clip, tmp_path, capsys):
    path = clip[0]
    (tmp_path / "afile").write_text("a file where the output folder should be")
    status, _, stderr = run_main(capsys, "video", str(path), "--out", str(tmp_path / "afile" / "x.mp4"))
    assert status == 2
    assert stderr.strip() == (f"lrp: error: cannot write {tmp_path}/afile/x.mp4: the folder {tmp_path}/afile cannot "
                              f"be made (a file is in the way); choose another output")
    status, _, stderr = run_main(capsys, "video", str(path), "--out", str(tmp_path / "x.mpg"))
    assert status == 2 and "unknown video format '.mpg'" in stderr and len(stderr.strip().splitlines()) == 1
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            status, _, stderr = run_main(capsys, "video", str(path), "--out", str(locked / "x.mp4"))
        finally:
            locked.chmod(0o755)
        assert status == 2 and f"the folder {locked} is not writable" in stderr
        assert list(locked.iterdir()) == []


def test_failure_midway_leaves_no_output(clip, tmp_path):
    """A model that fails on the second batch: the error names the video, the old output is untouched and no
    partial file remains."""
    calls = []

    class Flaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = lrp.models.mnist()

        def forward(self, x):
            calls.append(len(x))
            if len(calls) > 1:
                raise RuntimeError("out of memory")
            return self.net(x)

    pipeline = Pipeline.load("mnist")
    pipeline.loaded.model = Flaky()
    out = tmp_path / "kept.mp4"
    out.write_bytes(b"an older video")
    with pytest.raises(VideoError, match=r"digits.mp4: model 'mnist' fails on the frames \(prepared as "
                                         r"\(1, 28, 28\)\): RuntimeError: out of memory"):
        explain_video(pipeline, clip[0], out, batch_size=4, progress=False)
    assert out.read_bytes() == b"an older video" and no_leftovers(tmp_path)
    # the second batch is the one lrp.Explainer records for replay; a failed recording is tried once more
    # eagerly (the tracer may be what failed), where the model's own error comes out
    assert calls == [4, 4, 4]


# --------------------------------------------------------------------------- in Python

def test_in_process_run_keeps_torch_threads(clip, tmp_path, capsys):
    """lrp video runs mnist on one torch thread; main() called in a process that goes on gives its threads back,
    also when it fails."""
    before = torch.get_num_threads()
    wanted = 3 if before == 2 else 2
    torch.set_num_threads(wanted)
    try:
        status, _, stderr = run_main(capsys, "video", str(clip[0]), "--out", str(tmp_path / "t.mp4"))
        assert status == 0, stderr
        assert torch.get_num_threads() == wanted
        status, _, _ = run_main(capsys, "video", str(clip[0]), "--out", str(tmp_path / "t.mp4"), "--target", "10")
        assert status == 2 and torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


def test_explain_hook_and_a_reader_passed_in(clip, tmp_path):
    """``explain=`` replaces LRP (here: no relevance, so the heatmap panel is the colour map's white middle); a
    VideoReader passed in is read but left to its caller to close."""
    calls = []

    def nothing(x, target):
        calls.append((tuple(x.shape), target))
        return torch.zeros(len(x), 28, 28)

    out = tmp_path / "hook.mp4"
    with VideoReader(clip[0]) as reader:
        closes = []
        original = reader.close
        reader.close = lambda: closes.append(1)
        summary = explain_video(Pipeline.load("mnist"), reader, out, target=3, batch_size=5, layout="side-by-side",
                                progress=False, explain=nothing)
        assert closes == []
        reader.close = original
    assert calls == [((5, 1, 28, 28), 3), ((5, 1, 28, 28), 3), ((2, 1, 28, 28), 3)]
    assert summary.frames == summary.explained == 12 and summary.rate == 25
    panel = read_clip(out)[0][:, :, 112:]
    assert panel.min() > 240  # white, as lrp.heatmap shows zero relevance


def test_crop_box_is_the_preprocessing_crop():
    pre = Preprocess(size=256, crop=224)
    # 333x250 -> resized to 341x256 -> the 224x224 from (58, 16), in the frame's pixels
    assert pre.crop_box(333, 250) == pytest.approx((58 * 333 / 341, 16 * 250 / 256, 282 * 333 / 341,
                                                    240 * 250 / 256))
    assert seen_box(333, 250, pre) == (57, 16, 275, 234)
    assert Preprocess(size=28).crop_box(96, 64) == (0, 0, 96, 64)  # no crop
    assert Preprocess(crop=100).crop_box(96, 64) == (0, 0, 96, 64)  # larger than the picture: from_image refuses
    picture = Image.fromarray((np.random.default_rng(0).random((250, 333, 3)) * 255).astype(np.uint8))
    x, seen = pre.from_image(picture)
    assert seen.size == (224, 224)  # from_image crops where crop_box says: resized, then its centre
    resized = picture.resize((341, 256), Image.Resampling.BILINEAR)
    assert np.array_equal(np.asarray(seen), np.asarray(resized.crop((58, 16, 282, 240))))


def test_side_by_side_heatmap_sits_on_the_crop(tmp_path, monkeypatch):
    """A torchvision model (resnet18, random weights, resize 256 and crop 224) on 333x250 frames: the panel shows
    lrp.heatmap(lrp.explain(frame)) resized to the part the model saw, exactly (before encoding), and the fill
    gray around it."""
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "random.pt"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=4).state_dict(), weights)
    pipeline = Pipeline.load("resnet18", weights)
    frames = (np.random.default_rng(0).random((2, 250, 333, 3)) * 255).astype(np.uint8)
    frames[:, :, :60] = 0
    path = tmp_path / "frames.webm"
    write_clip(path, frames, codec="libvpx-vp9")
    shown = []
    write = VideoWriter.write
    monkeypatch.setattr(VideoWriter, "write", lambda self, batch, stamps: (shown.extend(batch),
                                                                            write(self, batch, stamps)))
    explain_video(pipeline, path, tmp_path / "out.webm", layout="side-by-side", progress=False)
    with VideoReader(path) as reader:
        decoded = [frame for frame, _ in reader]
    left, top, right, bottom = box = seen_box(333, 250, pipeline.pre)
    assert box == (57, 16, 275, 234) and len(shown) == 2
    composite = pipeline.composite("epsilon-plus-flat", kind="image")[0]
    for frame, output in zip(decoded, shown):
        assert np.array_equal(output[:, :333], frame)
        relevance = lrp.explain(pipeline.model, pipeline.image(Image.fromarray(frame)).x[None],
                                composite=composite).relevance[0]
        expected = np.asarray(lrp.heatmap(relevance, size=(right - left, bottom - top))).astype(int)
        panel = output[:, 333:].astype(int)
        assert np.abs(panel[top:bottom, left:right] - expected).max() <= 1  # colours rounded in float32 here
        panel[top:bottom, left:right] = lrp.video.PANEL_OUTSIDE
        assert (panel == lrp.video.PANEL_OUTSIDE).all()


# --------------------------------------------------------------------------- the README's command lines

def test_readme_video_lines_run(tmp_path):
    import torchvision

    block = re.search(r"## Video\n+```\n(.*?)```", README, re.S).group(1)
    lines = [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("lrp video ")]
    assert len(lines) == 2
    write_clip(tmp_path / "digits.mp4", digit_frames(8))
    sweep = (np.random.default_rng(1).random((7, 256, 320, 3)) * 255).astype(np.uint8)  # an MRI sweep, say
    write_clip(tmp_path / "sweep.webm", sweep, codec="libvpx-vp9")
    torch.save(torchvision.models.resnet18(weights=None, num_classes=4).state_dict(), tmp_path / "finetuned.pt")
    (tmp_path / "classes.txt").write_text("glioma\nmeningioma\nnone\npituitary\n")
    for line in lines:
        result = subprocess.run([sys.executable, "-m", "lrp.cli", *shlex.split(line)[1:]], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (line, result.stderr)
    assert read_clip(tmp_path / "digits_lrp.mp4")[0].shape == (8, 112, 112, 3)
    written = read_clip(tmp_path / "sweep_lrp.mp4")[0]
    assert written.shape == (7, 256, 640, 3)  # side by side
