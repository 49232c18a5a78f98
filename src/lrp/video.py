"""``lrp video``: explain a video frame by frame and write it back with the heatmaps drawn in.

Decoding and encoding go through PyAV (``pip install 'lrp[video]'``), whose wheels bundle FFmpeg: no ``ffmpeg``
binary is needed, every common container and codec reads (mp4, mov, mkv, webm, avi, animated gif), each frame
comes with its timestamp (so variable frame rates survive in mp4, mov, mkv, webm and gif), and H.264, VP9, MPEG-4
and GIF are written.

The frames go through the model's preprocessing (:meth:`lrp.pipeline.Pipeline.image`), are explained in batches
by one :class:`lrp.Explainer` (what the weights give is built once for the whole video), rendered in batches with
torch on the pipeline's device, and encoded. The output has the input's frame count, timestamps (so its frame
rate; AVI stores a constant rate only: the input's average one) and frame size (sizes that H.264 cannot store, odd
ones, get one pixel of edge added); the audio is not copied. It is written to a hidden file next to the output and
renamed at the end, so that a failed run leaves nothing behind. A video that ends before the length its file states
(cut short) gives the frames that could be read, with a note.

Colours: each explained frame's relevance is scaled by its own largest magnitude (as :func:`lrp.heatmap` and
:func:`lrp.overlay` do for one picture), so every frame uses the colour map's full range and colour strength is not
comparable between frames. The overlay's gray base is the frame's brightness mapped linearly (no per-frame contrast
stretch, unlike :func:`lrp.overlay`'s default (1, 99) percentile stretch, which would make the brightness flicker).

Where the preprocessing crops (torchvision models: the centre 224x224 of the frame resized to 256), the heatmap is
mapped back onto the part of the frame the model saw, and the rest of the frame is shown darkened.
"""

from __future__ import annotations

import functools
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union, cast

import av
import av.video.reformatter
import av.video.stream
import numpy as np
import torch
from PIL import Image

from .composites import Composite
from .errors import InputError, LRPError, ModelError, TargetError, one_line
from .explain import Explainer
from .pipeline import Pipeline
from .pipeline.inputs import Preprocess
from .visualize import COLORMAPS

# output suffix -> (container format, codec family)
OUTPUT_FORMATS: dict[str, tuple[str, str]] = {
    ".mp4": ("mp4", "h264"), ".m4v": ("mp4", "h264"), ".mov": ("mov", "h264"), ".mkv": ("matroska", "h264"),
    ".webm": ("webm", "vp9"), ".avi": ("avi", "mpeg4"), ".gif": ("gif", "gif"),
}
READABLE = "a video file (mp4, mov, mkv, webm, avi or animated gif)"
LAYOUTS = ("overlay", "side-by-side")
ALPHA, GAMMA = 0.75, 0.5  # as lrp.overlay: colour weight alpha * |t|, t = sign(r) |r| ** gamma
BASE_RANGE = (0.3, 0.9)  # the frame in gray, lifted into this light range so that red and blue show on black
OUTSIDE = 0.45  # the part of the frame the model did not see (cropped off): darkened by this factor
PANEL_OUTSIDE = 64  # side-by-side: the heatmap panel's gray where the model saw nothing
RENDER_PIXELS = 1 << 22  # frames are rendered in chunks of at most this many pixels
BUFFER_BYTES = 256 << 20  # decoded frames held while their explanation is pending (--every, batches)
Stamp = tuple[Optional[int], Optional[int]]  # a frame's pts and duration in its stream's time base (None: unknown)


class VideoError(InputError):
    """A video that cannot be read, or an output that cannot be written: one line naming the file and the way
    out."""


@dataclass
class VideoSummary:
    """What :func:`explain_video` wrote, and how fast."""

    out: Path
    frames: int  # frames written (= frames read)
    explained: int  # frames sent through the model
    width: int
    height: int
    rate: Fraction  # the output's average frame rate: frames / the time its timestamps span
    codec: str
    seconds: float  # decode -> explain -> render -> encode, from the first frame to the renamed file
    notes: list[str] = field(default_factory=list)
    stated: Optional[int] = None  # the frames the input's file states (about), where it ends early; else None

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("inf")

    def line(self) -> str:
        every = "" if self.explained == self.frames else f", {self.explained} of them explained"
        if self.stated is not None:
            every += f" (the input ends early: its file states about {self.stated})"
        return (f"wrote {self.out}: {self.frames} frames{every}, {self.width}x{self.height} at "
                f"{_rate_text(self.rate)} frames/s ({self.codec}); {self.frames_per_second:.1f} frames/s end to end "
                f"(decode, explain, render, encode) in {self.seconds:.1f} s")


def _rate_text(rate: Fraction) -> str:
    return f"{float(rate):.3f}".rstrip("0").rstrip(".")


# --------------------------------------------------------------------------- reading

class VideoReader:
    """The frames of a video file as RGB arrays (H, W, 3) uint8, upright, with their timestamps. Opening reads
    the first frame, so a file that cannot be decoded fails here (:class:`VideoError`), before any model loads."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        try:
            if self.path.is_dir():
                raise VideoError(f"{self.path}: is a folder; give {READABLE}")
            if not self.path.exists():
                raise VideoError(f"{self.path}: no such file")
        except OSError as exc:  # permission denied on a folder above it, a name too long, ...
            raise VideoError(f"{self.path}: cannot be read ({exc.strerror or exc})") from None
        try:
            self.container = av.open(str(self.path), "r")
        except av.FFmpegError as exc:
            raise VideoError(f"{self.path}: not a readable video ({_reason(exc)}); give {READABLE}") from None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        container = self.container
        if not container.streams.video:
            raise VideoError(f"{self.path}: holds no video stream (a {container.format.name} file with "
                             f"{_stream_kinds(container)}); give {READABLE}")
        self.stream = container.streams.video[0]
        context = self.stream.codec_context
        if context is None:
            raise VideoError(f"{self.path}: unknown video codec: the FFmpeg bundled with PyAV{_ffmpeg_version()} has "
                             f"no decoder for it; re-encode the video as H.264 (mp4) or VP9 (webm)")
        self.codec = context.name
        self.stream.thread_type = "AUTO"
        self.has_audio = bool(container.streams.audio)
        rate = self.stream.average_rate or self.stream.guessed_rate or self.stream.base_rate
        self.rate = Fraction(rate) if rate else Fraction(25)
        self.known_rate = bool(rate)
        base = self.stream.base_rate  # the lowest rate all timestamps fit: another than the average one means VFR
        self.variable_rate = bool(rate and base and Fraction(base) != self.rate)
        self.time_base = Fraction(self.stream.time_base) if self.stream.time_base else 1 / self.rate
        self.frame_count: Optional[int] = self.stream.frames or None  # None: the container does not say
        self.rotation = 0  # degrees the frames were turned (counterclockwise) to show them upright
        # what was read, to tell a video cut short (see ends_early)
        self.frames_read = 0
        self._first_pts: Optional[int] = None
        self._end_pts: Optional[int] = None  # the last frame's pts + duration
        self.stopped: Optional[str] = None  # why decoding stopped before the end of the file (FFmpeg's reason)
        self._rgb = av.video.reformatter.VideoReformatter()
        self._frames = self._decode()
        try:
            first = next(self._frames)
        except StopIteration:
            raise VideoError(f"{self.path}: the video stream holds no frames") from None
        self._first: Optional[tuple[np.ndarray, Stamp]] = first
        self.height, self.width = first[0].shape[:2]

    def _decode(self) -> Iterator[tuple[np.ndarray, Stamp]]:
        count = 0
        packets = self.container.demux(self.stream)
        while True:
            try:
                packet = next(packets)
                decoded = packet.decode()
            except StopIteration:
                return
            except av.FFmpegError as exc:
                if not count:
                    raise VideoError(f"{self.path}: the video cannot be decoded at its first frame ({_reason(exc)}); "
                                     f"the file is broken or cut short") from None
                # a file cut short often ends in half a packet: keep the frames before it (see ends_early)
                self.stopped = _reason(exc)
                return
            for frame in decoded:
                # one converter for all frames (a frame's own builds its scaler anew: ~10x slower at small sizes)
                array: np.ndarray = self._rgb.reformat(frame, format="rgb24").to_ndarray()
                turn = int(round(frame.rotation or 0)) % 360
                if turn in (90, 180, 270):  # the display matrix: turn counterclockwise to show it upright
                    array = np.ascontiguousarray(np.rot90(array, k=turn // 90))
                    self.rotation = turn
                count += 1
                self._track(frame.pts, frame.duration or None)
                yield array, (frame.pts, frame.duration or None)

    def _track(self, pts: Optional[int], duration: Optional[int]) -> None:
        self.frames_read += 1
        if pts is None:
            return
        if self._first_pts is None:
            self._first_pts = pts
        step = duration or max(1, round(1 / (self.rate * self.time_base)))  # unknown: one frame at the rate
        self._end_pts = max(self._end_pts or pts + step, pts + step)

    def stated_seconds(self) -> Optional[float]:
        """How long the file says the video lasts, in seconds (None: it does not say): the video stream's
        duration, or with a frame count that an edit list cannot shorten (not MP4/MOV: they count samples that
        an edit list may drop) the time those frames take at the average rate, or the whole file's duration when
        it holds video only."""
        stream, container = self.stream, self.container
        seconds: Optional[float] = None
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        elif stream.metadata.get("DURATION"):  # Matroska and WebM (as FFmpeg writes them): per stream
            seconds = _clock_seconds(stream.metadata["DURATION"])
        elif container.duration and all(s.type == "video" for s in container.streams):
            seconds = container.duration / av.time_base
        if self.frame_count and "mp4" not in container.format.name.split(","):
            seconds = max(seconds or 0.0, float(self.frame_count / self.rate))
        return seconds

    def stated_frames(self) -> Optional[int]:
        """About how many frames the file states it holds (None: it does not say)."""
        seconds = self.stated_seconds()
        counts = [n for n in (self.frame_count, round(seconds * self.rate) if seconds else None) if n]
        return max(counts) if counts else None

    def ends_early(self) -> bool:
        """After the last frame was read: whether the frames read end more than two frames' time before the
        length the file states (or, where it states a frame count only, are fewer), or decoding stopped on an
        error. Not an error in itself: the frames read are fine, and a trimmed file may state more than it holds."""
        if self.stopped is not None:
            return True
        stated = self.stated_seconds()
        if stated is not None and self._first_pts is not None and self._end_pts is not None:
            seconds = float((self._end_pts - self._first_pts) * self.time_base)
            return seconds < stated - 2.5 / float(self.rate)
        return bool(self.frame_count and self.frames_read < self.frame_count)

    def early_end_text(self) -> str:
        """What :meth:`ends_early` found, in a sentence for the user."""
        read, stated = self.frames_read, self.stated_frames()
        why = f"; decoding stopped: {self.stopped}" if self.stopped else ""
        if stated is not None and stated > read:
            return (f"{self.path} ends early: {read} frames read, the file says about {stated} (it may be cut "
                    f"short{why}); the output has the {read} frames read")
        if self.stopped is not None:
            return (f"{self.path} ends early: decoding stopped after {read} frames ({self.stopped}); the file may "
                    f"be broken or cut short; the output has the {read} frames read")
        read_seconds = float(((self._end_pts or 0) - (self._first_pts or 0)) * self.time_base)
        return (f"{self.path} ends early: {read} frames read, {read_seconds:.2f} s, the file says about "
                f"{self.stated_seconds() or 0:.2f} s (it may be cut short); the output has the {read} frames read")

    def __iter__(self) -> Iterator[tuple[np.ndarray, Stamp]]:
        """(frame, (pts, duration) in :attr:`time_base`, or None) for every frame, the first one included."""
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        for array, stamp in self._frames:
            if array.shape[:2] != (self.height, self.width):
                raise VideoError(f"{self.path}: the frame size changes from {self.width}x{self.height} to "
                                 f"{array.shape[1]}x{array.shape[0]} within the video, which lrp video does not "
                                 f"handle; re-encode it at one size")
            yield array, stamp

    def timed_rate(self) -> Optional[Fraction]:
        """The average frame rate the timestamps give: frames / the time from the first frame's start to the last
        one's end, read from the packets (no decoding) of a second opening of the file. A container may state
        another rate than its timestamps keep (a variable-rate .mkv saying 30); None where they give none."""
        starts: list[int] = []
        end: Optional[int] = None
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                base = Fraction(stream.time_base) if stream.time_base else None
                for packet in container.demux(stream):
                    if packet.pts is None or not packet.size:  # no time, or the demuxer's closing empty packet
                        continue
                    starts.append(packet.pts)
                    if packet.duration:
                        end = max(end or 0, packet.pts + packet.duration)
        except (av.error.FFmpegError, OSError):  # a broken tail: what was read so far
            pass
        if base is None or len(starts) < 2:
            return None
        first, last = min(starts), max(starts)
        stop = end if end is not None and end > last else last + Fraction(last - first, len(starts) - 1)
        span = (stop - first) * base
        return Fraction(len(starts)) / span if span > 0 else None

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clock_seconds(text: str) -> Optional[float]:
    """'00:00:01.600000000' -> 1.6; None where it does not read."""
    try:
        hours, minutes, seconds = text.strip().split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


def _reason(exc: BaseException) -> str:
    """An FFmpeg error without its errno and file name: 'Invalid data found when processing input'."""
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).split(": '")[0]


def _stream_kinds(container) -> str:
    kinds = sorted({s.type for s in container.streams})
    return ", ".join(f"{k} streams" for k in kinds) if kinds else "no streams"


def _ffmpeg_version() -> str:
    versions = getattr(av, "library_versions", {}).get("libavcodec")
    return f" (libavcodec {'.'.join(map(str, versions))})" if versions else ""


# --------------------------------------------------------------------------- writing

def check_output(out: Union[str, Path], source: Union[str, Path, None] = None) -> tuple[str, str]:
    """(container format, codec family) for an output path, from its suffix; :class:`VideoError` where the suffix
    is unknown, the path is a folder or (given ``source``) it is the input video itself."""
    out = Path(out)
    fmt = OUTPUT_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise VideoError(f"{out}: unknown video format {out.suffix or '(no suffix)'!r}; end the output's name "
                         f"with {', '.join(OUTPUT_FORMATS)} (.mp4: H.264, .webm: VP9, .avi: MPEG-4, .gif: GIF)")
    try:
        folder = out.is_dir()
    except OSError as exc:  # permission denied on a folder above it, a name too long, ...
        raise VideoError(f"cannot write {out} ({exc.strerror or exc}); choose another output") from None
    if folder:
        raise VideoError(f"{out}: is a folder; give the output video's file name, e.g. {out / 'explained.mp4'}")
    if source is not None and os.path.realpath(out) == os.path.realpath(source):
        raise VideoError(f"{out}: is the input video; give another output name")
    return fmt


def _encoder(family: str) -> tuple[str, dict[str, str]]:
    """The codec that writes ``family`` here and its options."""
    wanted: dict[str, list[tuple[str, dict[str, str]]]] = {
        "h264": [("libx264", {"crf": "18", "preset": "veryfast"}), ("libopenh264", {}), ("mpeg4", {})],
        "vp9": [("libvpx-vp9", {"crf": "30", "b": "0", "deadline": "realtime", "cpu-used": "8", "row-mt": "1"}),
                ("libvpx", {"crf": "10", "b": "1M"})],
        "mpeg4": [("mpeg4", {})],
        "gif": [("gif", {})],
    }
    for name, options in wanted[family]:
        if name in av.codecs_available:
            return name, options
    raise VideoError(f"the FFmpeg bundled with PyAV here cannot encode {family}; write another format (.mp4, "
                     f".webm, .avi or .gif)")


class VideoWriter:
    """Encodes frames into a hidden file next to ``out``; :meth:`finish` renames it to ``out``, :meth:`abort`
    removes it (and the folders it created)."""

    def __init__(self, out: Union[str, Path], width: int, height: int, rate: Fraction, time_base: Fraction,
                 note: Callable[[str], None] = lambda text: None, variable_rate: bool = False):
        self.out = Path(out)
        fmt, family = check_output(self.out)
        self.codec, options = _encoder(family)
        if variable_rate and self.codec == "libx264":  # without reordered frames MP4 keeps every frame's duration
            options = {**options, "bf": "0"}
        self.family = family
        self.width, self.height = width, height
        # libx264, libopenh264 and mpeg4 store 4:2:0 colour at even sizes only: an odd size gets an edge pixel
        even = self.codec in ("libx264", "libopenh264", "mpeg4")
        self.pad = (width % 2 if even else 0, height % 2 if even else 0)
        if any(self.pad):
            note(f"{self.codec} stores even frame sizes only: the {width}x{height} frames get one pixel of their "
                 f"edge repeated ({width + self.pad[0]}x{height + self.pad[1]}); write .webm or .gif to keep "
                 f"{width}x{height}")
        self._created = self._make_folder()
        self.temp = self.out.parent / f".{self.out.name}.{secrets.token_hex(4)}.partial"
        try:
            fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
            os.close(fd)
        except OSError as exc:
            self._remove_folders()
            raise VideoError(f"cannot write {self.out}: the folder {self.out.parent} is not writable "
                             f"({exc.strerror}); choose another output") from None
        try:
            self.container = av.open(str(self.temp), "w", format=fmt,
                                     options={"movflags": "+faststart"} if fmt in ("mp4", "mov") else {})
            self._open_stream(rate, time_base, options)
        except av.FFmpegError as exc:
            self.abort()
            raise VideoError(f"cannot write {self.out} with {self.codec} ({_reason(exc)}); try another format "
                             f"(.mp4, .webm, .gif)") from None
        self._last = -1
        self._index = 0
        self._durations: dict[int, int] = {}  # pts -> duration, in the output's time base
        # what was written, for the average rate and the notes: the first pts and the last one's end (output time
        # base), frames without a timestamp, and (constant rate: AVI) how far frames moved from their input times
        self._first: Optional[int] = None
        self._end: Optional[int] = None
        self.unstamped = 0
        self._first_stamp: Optional[int] = None
        self.largest_shift = 0.0  # seconds

    def _make_folder(self) -> list[Path]:
        missing = []
        folder = self.out.parent
        try:
            while not folder.exists() and folder != folder.parent:
                missing.append(folder)
                folder = folder.parent
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) \
                else exc.strerror
            raise VideoError(f"cannot write {self.out}: the folder {self.out.parent} cannot be made ({reason}); "
                             f"choose another output") from None
        return missing

    def _remove_folders(self) -> None:
        for folder in self._created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break

    def _open_stream(self, rate: Fraction, time_base: Fraction, options: dict[str, str]) -> None:
        # rate: the input's average rate; timestamps are copied, so variable frame rates are kept, except in MPEG-4
        # part 2 (AVI): a constant rate, one frame per tick of a time base whose denominator is below 2**16 (the
        # closest such to 1 / rate: 24000/1001 stays exact, an odd measured average such as 450000/18751 moves by
        # under a millionth)
        constant = self.family == "mpeg4" or self.codec == "mpeg4"
        if constant:
            rate = 1 / (1 / rate).limit_denominator((1 << 16) - 1)
        self.stream = cast(av.video.stream.VideoStream,
                           self.container.add_stream(self.codec, rate=rate, options=options))
        self.stream.width = self.width + self.pad[0]
        self.stream.height = self.height + self.pad[1]
        self.stream.pix_fmt = "pal8" if self.family == "gif" else "yuv420p"
        if constant:
            self.time_base = 1 / rate
            self.stream.bit_rate = int(max(1_000_000, 0.25 * self.stream.width * self.stream.height * float(rate)))
            self.copy_pts = False
        elif self.family == "gif":  # GIF stores delays in hundredths of a second
            self.time_base = Fraction(1, 100)
            self.copy_pts = True
        else:
            self.time_base = time_base
            self.copy_pts = True
        self.stream.codec_context.time_base = self.time_base
        self._source_base = time_base
        self._step = max(1, round(1 / (rate * self.time_base)))  # one frame, in the output's time base

    def write(self, frames: np.ndarray, stamps: list[Stamp]) -> None:
        """Encode frames (B, H, W, 3) uint8 RGB with their timestamps and durations (in the input's time base, or
        None)."""
        if any(self.pad):
            frames = np.pad(frames, ((0, 0), (0, self.pad[1]), (0, self.pad[0]), (0, 0)), mode="edge")
        for array, (stamp, duration) in zip(frames, stamps):
            if self.family == "gif":
                frame = _palette_frame(array)
            else:
                frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if not self.copy_pts:
                value = self._index
            elif stamp is not None:
                value = int(round(stamp * self._source_base / self.time_base))
            else:  # a frame without a timestamp: one frame's time after the last
                value = self._last + self._step
            value = max(value, self._last + 1)  # strictly increasing, also where rounding merges two stamps
            frame.pts, frame.time_base = value, self.time_base
            self._last = value
            self._track(value, stamp, duration)
            try:
                if self.copy_pts and duration:  # the muxer writes it for the last frame (GIF: its delay)
                    self._durations[value] = max(1, int(round(duration * self._source_base / self.time_base)))
                self._mux(self.stream.encode(frame))
            except av.FFmpegError as exc:
                raise VideoError(f"cannot write {self.out}: {self.codec} fails at frame {self._index} "
                                 f"({_reason(exc)}); try another format (.mp4, .webm, .gif)") from None
            self._index += 1

    def _track(self, value: int, stamp: Optional[int], duration: Optional[int]) -> None:
        if stamp is None:
            self.unstamped += 1
        if self._first is None:
            self._first = value
        if not self.copy_pts:
            length = 1
            if stamp is not None:  # how far the constant rate put this frame from its time in the input
                if self._first_stamp is None:
                    self._first_stamp = stamp
                wanted = (stamp - self._first_stamp) * self._source_base
                self.largest_shift = max(self.largest_shift, abs(float(self._index * self.time_base - wanted)))
        else:
            length = max(1, int(round(duration * self._source_base / self.time_base))) if duration else self._step
        self._end = max(self._end or 0, value + length)

    def average_rate(self) -> Optional[Fraction]:
        """Frames written / the time they span (the first frame's start to the last one's end), as players
        and ``ffprobe`` give the average frame rate; None before a frame was written."""
        if self._first is None or self._end is None or self._end <= self._first:
            return None
        return self._index / ((self._end - self._first) * self.time_base)

    def shifted(self) -> bool:
        """Whether the constant rate (AVI) moved a frame by more than half a frame from its input time: the
        input's frame rate varies."""
        return not self.copy_pts and self.largest_shift > 0.5 * float(self.time_base)

    def _mux(self, packets: list) -> None:
        for packet in packets:
            duration = self._durations.pop(packet.pts, None) if packet.pts is not None else None
            if duration is not None and not packet.duration:
                packet.duration = duration
            self.container.mux(packet)

    def finish(self) -> None:
        """Flush the encoder, close the file and rename it to the output."""
        try:
            self._mux(self.stream.encode())
            self.container.close()
        except av.FFmpegError as exc:
            self.abort()
            raise VideoError(f"cannot write {self.out} ({_reason(exc)}); choose another output") from None
        try:
            os.replace(self.temp, self.out)
        except OSError as exc:  # a folder took its name meanwhile, a read-only mount, ...
            self.abort()
            raise VideoError(f"cannot write {self.out} ({exc.strerror or exc}); choose another output") from None

    def abort(self) -> None:
        """Close and remove the partial file (and the folders made for it)."""
        container = getattr(self, "container", None)
        if container is not None:
            try:
                container.close()
            except Exception:
                pass
        try:
            self.temp.unlink()
        except OSError:
            pass
        self._remove_folders()


def _palette_frame(array: np.ndarray) -> av.VideoFrame:
    """An RGB frame as a GIF frame: 256 colours of its own (PIL's fast octree)."""
    image = Image.fromarray(array).quantize(256, method=Image.Quantize.FASTOCTREE)
    indices = np.asarray(image, dtype=np.uint8)
    colours = np.asarray(image.getpalette() or [], dtype=np.uint8).reshape(-1, 3)[:256]
    palette = np.zeros((256, 4), dtype=np.uint8)
    palette[:, 0] = 255  # opaque (ARGB)
    palette[:len(colours), 1:] = colours
    pair: Any = (indices, palette)  # PyAV's stubs know only plain arrays
    return av.VideoFrame.from_ndarray(pair, format="pal8")


# --------------------------------------------------------------------------- where the model looks

def seen_box(width: int, height: int, pre: Preprocess) -> tuple[int, int, int, int]:
    """The part of a ``width`` x ``height`` frame the model sees after ``pre``'s resize and centre crop:
    (left, top, right, bottom) in the frame's pixels, :meth:`Preprocess.crop_box` rounded to whole pixels."""
    left, top, right, bottom = pre.crop_box(width, height)
    return round(left), round(top), round(right), round(bottom)


# --------------------------------------------------------------------------- rendering

class Renderer:
    """Frames and relevance maps -> output frames, a batch at a time, with torch on ``device``.

    ``overlay``: the frame in gray, lightened, with the heatmap blended in where the model looked (as
    :func:`lrp.overlay`: the relevance scaled by its largest magnitude per frame, colour ``cmap(t)`` with weight
    ``alpha * |t|``, ``t = sign(r) |r| ** 0.5``, per relevance pixel, then resized bilinearly onto the frame); the
    part cut off by the crop darkened. ``side-by-side``: the frame as it is, and next to it the heatmap (as
    :func:`lrp.heatmap`: each relevance pixel a block of its colour) over the part the model saw."""

    def __init__(self, width: int, height: int, box: tuple[int, int, int, int], layout: str = "overlay",
                 cmap: str = "bwr", device: Union[str, torch.device] = "cpu"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if cmap not in COLORMAPS:
            raise ValueError(f"unknown colour map {cmap!r}; choose one of {', '.join(COLORMAPS)}")
        self.width, self.height, self.box, self.layout = width, height, box, layout
        self.device = torch.device(device)
        self.anchors = torch.tensor(COLORMAPS[cmap], dtype=torch.float32, device=self.device)
        self.full = box == (0, 0, width, height)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of a rendered frame."""
        return (self.width * (2 if self.layout == "side-by-side" else 1), self.height)

    def colours(self, t: torch.Tensor) -> torch.Tensor:
        """Values in [-1, 1] (any shape) -> RGB in [0, 255] (shape + (3,)), as :func:`lrp.visualize.colorize`
        (before its rounding): linear between the colour map's evenly spaced anchors."""
        k = len(self.anchors) - 1
        u = ((t.clamp(-1, 1) + 1) * (k / 2))[..., None]
        colour = self.anchors[0].expand(*t.shape, 3)
        for j in range(k):  # add each segment's share: no gather, a few elementwise ops
            colour = colour + (u - j).clamp(0, 1) * (self.anchors[j + 1] - self.anchors[j])
        return colour

    def __call__(self, frames: torch.Tensor, maps: torch.Tensor) -> np.ndarray:
        """``frames`` (B, H, W, 3) uint8, ``maps`` (B, h, w) relevance -> (B, H, W or 2W, 3) uint8 (NumPy)."""
        step = max(1, RENDER_PIXELS // (self.width * self.height))
        parts = [self._render(frames[i:i + step].to(self.device), maps[i:i + step].to(self.device, torch.float32))
                 for i in range(0, len(frames), step)]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _render(self, frames: torch.Tensor, maps: torch.Tensor) -> np.ndarray:
        vmax = maps.abs().amax((1, 2), keepdim=True)
        ok = (vmax > 0) & torch.isfinite(vmax)
        scaled = torch.where(ok, maps / torch.where(ok, vmax, torch.ones_like(vmax)), torch.zeros_like(maps))
        scaled = scaled.clamp(-1, 1)
        left, top, right, bottom = self.box
        h, w = maps.shape[1:]
        out = torch.empty((len(frames), self.height, self.size[0], 3), dtype=torch.uint8, device=self.device)
        if self.layout == "side-by-side":
            # as lrp.heatmap: colours rounded, then each relevance pixel shown as a block (nearest, as PIL resizes)
            heat = self.colours(scaled).round_().to(torch.uint8)
            rows = _nearest(h, bottom - top, self.device)
            cols = _nearest(w, right - left, self.device)
            out[:, :, :self.width] = frames
            panel = out[:, :, self.width:]
            if not self.full:
                panel.fill_(PANEL_OUTSIDE)
            panel[:, top:bottom, left:right] = heat.index_select(1, rows).index_select(2, cols)
            return out.cpu().numpy()
        # colour and weight per relevance pixel (colour premultiplied by its weight), resampled onto the seen part
        t = torch.sign(scaled) * scaled.abs() ** GAMMA
        weight = ALPHA * t.abs()
        layers = torch.cat([self.colours(t) * weight[..., None], weight[..., None]], -1)  # (B, h, w, 4), 0..255
        rows_matrix = _resampling(h, bottom - top, self.device)
        cols_matrix = _resampling(w, right - left, self.device)
        layers = torch.einsum("yh,bhwc,xw->byxc", rows_matrix, layers, cols_matrix)  # (B, bh, bw, 4)
        # the frame in gray (mean of R, G, B), lifted into BASE_RANGE, in 0..255
        gray = frames[..., 0].float().add_(frames[..., 1]).add_(frames[..., 2])
        base = gray.mul_((BASE_RANGE[1] - BASE_RANGE[0]) / 3).add_(BASE_RANGE[0] * 255)[..., None]
        seen = base[:, top:bottom, left:right]
        blended = torch.addcmul(layers[..., :3], seen, 1 - layers[..., 3:])
        if self.full:
            out.copy_(blended.add_(0.5).clamp_(0, 255))  # + 0.5, then truncation: rounding
        else:
            out.copy_(base.mul(OUTSIDE).add_(0.5).expand(-1, -1, -1, 3))
            out[:, top:bottom, left:right] = blended.add_(0.5).clamp_(0, 255)
        return out.cpu().numpy()


def _nearest(source: int, target: int, device: torch.device) -> torch.Tensor:
    """Indices of the source pixel that each of ``target`` pixels shows: PIL's nearest resize (as
    :func:`lrp.heatmap` with ``size``) of a line of pixel indices, so that ties fall as PIL's do."""
    return torch.from_numpy(_nearest_indices(source, target)).to(device)


@functools.lru_cache(maxsize=16)
def _nearest_indices(source: int, target: int) -> np.ndarray:
    line = Image.fromarray(np.arange(source, dtype=np.int32)[None])  # mode "I": 32-bit integers
    return np.asarray(line.resize((target, 1), Image.Resampling.NEAREST), dtype=np.int64)[0]


def _resampling(source: int, target: int, device: torch.device) -> torch.Tensor:
    """(target, source) weights that resample a line of ``source`` pixels to ``target``: bilinear when enlarging
    (as ``F.interpolate(mode="bilinear", align_corners=False)``), the mean over each target pixel's extent when
    shrinking. One matrix per axis: resampling a batch is two matrix products."""
    weights = torch.zeros(target, source, dtype=torch.float64)
    scale = source / target
    if target >= source:
        position = ((torch.arange(target, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
        low = position.floor().long().clamp(max=source - 1)
        high = (low + 1).clamp(max=source - 1)
        frac = position - low
        rows = torch.arange(target)
        weights.index_put_((rows, low), 1 - frac, accumulate=True)
        weights.index_put_((rows, high), frac, accumulate=True)
    else:
        edges = torch.arange(target + 1, dtype=torch.float64) * scale
        pixels = torch.arange(source, dtype=torch.float64)
        overlap = (torch.minimum(edges[1:, None], pixels[None] + 1) - torch.maximum(edges[:-1, None], pixels[None]))
        weights = overlap.clamp(min=0) / scale
    return weights.to(device, torch.float32)


# --------------------------------------------------------------------------- the whole run

# as for lrp serve: models with fewer parameters are no faster on more than one torch thread, and many times slower
# when threads wait for each other while other work (another process, or the encoder's own threads) keeps the cores
# busy (seen: MNIST end to end 86 frames/s on two threads, 540 on one, while another job used both cores)
SMALL_MODEL = 5_000_000


def _small(model: torch.nn.Module) -> bool:
    return sum(p.numel() for p in model.parameters()) < SMALL_MODEL


def default_batch_size(model: torch.nn.Module) -> int:
    """64 frames for small models (under 5 M parameters, such as mnist), else 16."""
    return 64 if _small(model) else 16


def default_threads(model: torch.nn.Module) -> Optional[int]:
    """The torch threads ``lrp video`` runs with: 1 for small models (under 5 M parameters), else None (torch's
    default, one per core)."""
    return 1 if _small(model) else None


Explain = Callable[[torch.Tensor, Optional[int]], torch.Tensor]  # (inputs, target) -> relevance


def explain_video(pipeline: Pipeline, source: Union[str, Path, VideoReader], out: Union[str, Path],
                  composite: Union[str, Composite] = "epsilon-plus-flat", target: Union[int, str, None] = None, *,
                  every: int = 1, batch_size: Optional[int] = None, layout: str = "overlay", cmap: str = "bwr",
                  progress: bool = True, note: Callable[[str], None] = lambda text: None,
                  explain: Optional[Explain] = None) -> VideoSummary:
    """Explain every ``every``-th frame of the video ``source`` with ``pipeline``'s model (frames in between show
    the last explained frame's heatmap) and write ``out`` (its suffix picks the format: ``.mp4``/``.mov``/
    ``.mkv`` H.264, ``.webm`` VP9, ``.avi`` MPEG-4, ``.gif``). Frames are explained ``batch_size`` at a time by
    one :class:`lrp.Explainer`; ``layout`` is ``overlay`` or ``side-by-side`` (see :class:`Renderer`; each
    frame's relevance is scaled by its own largest magnitude). ``note`` receives what the user should know (audio
    dropped, crop, padding, an input that ends early).

    ``source`` is a path, or a :class:`VideoReader` that the caller opened: it is read to its end but not closed
    (close it, or open it in a ``with`` block). ``explain``, in place of LRP with ``composite`` (to compare
    methods, as ``benchmarks/video.py`` does): a function of (the prepared frames (B, C, H, W) on the pipeline's
    device, the target class index or None: each frame's predicted class) that returns their relevance,
    (B, C, H, W) or (B, H, W).

    Raises :class:`VideoError` (the video or the output), ``ModelError``/``TargetError``; a failed run leaves no
    output file."""
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    check_output(out, source.path if isinstance(source, VideoReader) else source)
    if isinstance(source, VideoReader):
        return _run(pipeline, source, Path(out), composite, target, every,
                    batch_size or default_batch_size(pipeline.model), layout, cmap, progress, note, explain)
    with VideoReader(source) as reader:
        return _run(pipeline, reader, Path(out), composite, target, every,
                    batch_size or default_batch_size(pipeline.model), layout, cmap, progress, note, explain)


def _run(pipeline: Pipeline, reader: VideoReader, out: Path, composite: Union[str, Composite],
         target: Union[int, str, None], every: int, batch_size: int, layout: str, cmap: str, progress: bool,
         note: Callable[[str], None], explain: Optional[Explain]) -> VideoSummary:
    from tqdm import tqdm

    index = pipeline.target(target)
    if explain is None:
        comp = pipeline.composite(composite, kind="image")[0] if isinstance(composite, str) else composite
        explainer = Explainer(pipeline.model, comp)
    width, height = reader.width, reader.height
    box = seen_box(width, height, pipeline.pre)
    renderer = Renderer(width, height, box, layout, cmap, pipeline.device)
    notes: list[str] = []

    def tell(text: str) -> None:
        notes.append(text)
        note(text)

    def lrp_relevance(x: torch.Tensor, target: Optional[int]) -> torch.Tensor:
        res = explainer(x, target)
        if pipeline.num_classes is None:
            pipeline.learn_classes(res.num_classes)
        return res.relevance

    explain_batch = explain or lrp_relevance
    if reader.rotation:
        tell(f"{reader.path} is shown turned by {reader.rotation} degrees (its display rotation): the model sees "
             f"and the output shows the frames upright")
    if box != (0, 0, width, height):
        tell(f"the model sees the centre {box[2] - box[0]}x{box[3] - box[1]} of each {width}x{height} frame (its "
             f"preprocessing crops; --crop 0 keeps the whole frame): the heatmap covers that part, the rest is "
             f"darkened")
    if reader.has_audio:
        tell(f"{reader.path} has sound: the output has none (lrp video writes the picture only)")
    out_width, out_height = renderer.size
    rate = reader.rate
    if OUTPUT_FORMATS.get(Path(out).suffix.lower(), ("", ""))[1] == "mpeg4":  # AVI: one constant rate, the average
        rate = reader.timed_rate() or reader.rate
    writer = VideoWriter(out, out_width, out_height, rate, reader.time_base, note=tell,
                         variable_rate=reader.variable_rate)
    frames_in_memory = max(batch_size, BUFFER_BYTES // (width * height * 3))
    buffered: list[tuple[np.ndarray, Stamp, int]] = []  # (frame, stamp, pending index or -1: held)
    pending: list[torch.Tensor] = []  # inputs of the frames to explain
    held: list[Optional[torch.Tensor]] = [None]  # the relevance map of the last explained frame
    counts = {"frames": 0, "explained": 0}
    start = time.perf_counter()

    def flush(bar: tqdm) -> None:
        maps = _explain_batch(explain_batch, pipeline, pending, index, reader.path) if pending else None
        counts["explained"] += len(pending)
        pending.clear()
        step = max(1, RENDER_PIXELS // (width * height))
        for i in range(0, len(buffered), step):
            chunk = buffered[i:i + step]
            frames = torch.from_numpy(np.stack([f for f, _, _ in chunk]))
            chosen = []
            for _, _, k in chunk:
                if k >= 0:
                    assert maps is not None
                    chosen.append(maps[k])
                else:
                    assert held[0] is not None
                    chosen.append(held[0])
            writer.write(renderer(frames, torch.stack(chosen)), [p for _, p, _ in chunk])
            bar.update(len(chunk))
        if maps is not None:
            held[0] = maps[-1]
        counts["frames"] += len(buffered)
        buffered.clear()

    try:
        with tqdm(total=reader.frame_count, desc="explaining", unit="frame", disable=None if progress else True,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            for number, (frame, stamp) in enumerate(reader):
                key = number % every == 0
                if (key and len(pending) == batch_size) or len(buffered) >= frames_in_memory:
                    flush(bar)
                if key:
                    pending.append(_prepare(pipeline, frame, reader.path, number))
                k = len(pending) - 1  # its explained frame in this batch, or -1: the one held from before
                buffered.append((frame, stamp, k))
            flush(bar)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    rate = writer.average_rate() or reader.rate
    early = reader.ends_early()
    if early:
        tell(reader.early_end_text())
    if writer.shifted():
        tell(f"AVI cannot keep variable frame timing: {out} plays at a constant {_rate_text(rate)} frames/s (the "
             f"average rate {reader.path} gives), so some frames show up to {writer.largest_shift:.2f} s away from "
             f"their time in {reader.path}; write .mp4, .mkv or .webm to keep the timing")
    if not writer.copy_pts and not reader.known_rate:
        tell(f"{reader.path} does not give its frame rate: {out} plays at {_rate_text(rate)} frames/s")
    elif writer.unstamped:
        tell(f"{writer.unstamped} frames of {reader.path} have no timestamp: each was placed one frame "
             f"({_rate_text(reader.rate)} frames/s{'' if reader.known_rate else ', assumed'}) after the one before")
    seconds = time.perf_counter() - start
    stated = reader.stated_frames() if early else None
    return VideoSummary(out, counts["frames"], counts["explained"], out_width + writer.pad[0],
                        out_height + writer.pad[1], rate, writer.codec, seconds, notes,
                        stated if stated is not None and stated > counts["frames"] else None)


def _prepare(pipeline: Pipeline, frame: np.ndarray, path: Path, number: int) -> torch.Tensor:
    """A frame through the model's preprocessing."""
    try:
        return pipeline.image(Image.fromarray(frame)).x
    except InputError as exc:
        raise VideoError(f"{path}: frame {number}: {str(exc).removeprefix('image: ')}") from None


def _explain_batch(explain: Explain, pipeline: Pipeline, inputs: list[torch.Tensor], target: Optional[int],
                   path: Path) -> torch.Tensor:
    """Relevance maps (B, h, w), summed over the channels, on the pipeline's device."""
    x = torch.stack(inputs).to(pipeline.device)
    try:
        relevance = explain(x, target)
    except (ModelError, TargetError):
        raise
    except LRPError as exc:
        raise VideoError(f"{path}: {one_line(exc)}") from None
    except Exception as exc:  # the model fails on the frames as prepared (a shape it does not read)
        raise VideoError(f"{path}: model {pipeline.name!r} fails on the frames (prepared as "
                         f"{tuple(x.shape[1:])}): {one_line(exc)}") from None
    relevance = relevance.detach()
    return relevance.reshape(len(inputs), -1, *relevance.shape[-2:]).sum(1)
