"""`refqsr-engine upscale IN.mp4 OUT.mp4`: super-resolve a video frame by frame with PyAV (FFmpeg).

One pass over the input: the packets of every stream are demuxed in file order, the first video
stream's packets are decoded, each frame is converted to RGB, upscaled by the caller's
``upscale_rgb``, encoded (libx264 / libvpx-vp9, yuv420p) and muxed; the audio and subtitle packets
are copied into the output unchanged. No list of frames is built: the memory held is a few frames
of the decoder and encoder (and the encoder's own look-ahead), whatever the length of the video.

Kept: each frame's timestamp in the source stream's time base (so a variable frame rate and a start
offset survive), the average frame rate, the colour tags (matrix, range, primaries, transfer), the
sample aspect ratio, the display matrix (rotation), chapters, the container's and the streams'
titles and languages. AVI has no per-frame timestamps: there the frames are put on the grid of the
average frame rate.

A stream the output container cannot carry (a subtitle format of another container, say) is an
error named with the containers that can carry it, raised before any frame is upscaled: no stream
is dropped without a word. Data streams (timecode tracks), attachments the output cannot hold and
further video streams (a second angle, cover art) are not copied; the report lists them under
``skipped_streams``.

The output is written to a temp file beside DST and renamed over DST only once complete: DST
appears whole or not at all, and an existing DST is replaced only on success.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import RefQSRError
from ..files import owned_temp_prefix, publish, remove_stale_temps

# The output containers: suffix -> FFmpeg muxer. A suffix is a video by these alone (is_video).
_MUXERS = {
    ".mp4": "mp4",
    ".m4v": "mp4",
    ".mkv": "matroska",
    ".webm": "webm",
    ".mov": "mov",
    ".avi": "avi",
}
VIDEO_EXTENSIONS = frozenset(_MUXERS)

# Default video encoder per output suffix, and the default --crf per encoder (x264's 18 is close to
# visually lossless; vp9's scale runs to 63, where 32 is its usual high-quality setting).
DEFAULT_CODECS = {".webm": "libvpx-vp9"}
DEFAULT_CODEC = "libx264"
DEFAULT_CRF = {"libx264": 18, "libx265": 20, "libvpx-vp9": 32, "libvpx": 10, "libsvtav1": 30}
PIX_FMT = "yuv420p"
MIN_PYAV = 18  # stream templates, codec option lists, display matrices and chapters as used here

# Metadata that describes the input file or its encoding, not the content: not carried over.
_FILE_TAGS = {"encoder", "major_brand", "minor_version", "compatible_brands"}
_VIDEO_STREAM_TAGS_DROPPED = ("encoder", "duration", "bps", "number_of_frames", "number_of_bytes", "_statistics")

UpscaleRGB = Callable[[np.ndarray], np.ndarray]
Progress = Callable[[int, "int | None"], None]
Say = Callable[[str], None]


class FrameMapper(Protocol):
    """Frames upscaled elsewhere (e.g. a pool of Ray actors): ``submit(rgb)`` starts one and returns
    a handle, ``result(handle)`` waits for its sH x sW x 3 float32 result; up to ``window`` frames
    are in flight, and results are taken in submission order."""

    window: int

    def submit(self, rgb: np.ndarray) -> Any: ...

    def result(self, handle: Any) -> np.ndarray: ...


class _Synchronous:
    """A plain ``upscale_rgb`` function as a :class:`FrameMapper` with nothing in flight."""

    window = 0

    def __init__(self, upscale_rgb: UpscaleRGB) -> None:
        self.upscale_rgb = upscale_rgb

    def submit(self, rgb: np.ndarray) -> np.ndarray:
        return self.upscale_rgb(rgb)

    def result(self, handle: np.ndarray) -> np.ndarray:
        return handle


def is_video(path: str | Path) -> bool:
    """Whether ``path`` names a video by its suffix (one of :data:`VIDEO_EXTENSIONS`, any case)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def default_codec(dst: str | Path) -> str:
    """The video encoder used for ``dst`` when none is given: libvpx-vp9 for .webm, else libx264."""
    return DEFAULT_CODECS.get(Path(dst).suffix.lower(), DEFAULT_CODEC)


def probe_video(
    src: str | Path, dst: str | Path, *, codec: str | None = None, crf: float | None = None
) -> dict[str, Any]:
    """Check, without decoding a frame, everything about ``upscale_video(src, dst, ...)`` a user can
    get wrong: the input is a readable video, DST's folder exists and is writable, DST's container is
    known, the encoder exists and takes ``crf``, and the output container can carry the video codec
    and every audio and subtitle stream. Raises :class:`RefQSRError`; returns what will be done:
    input size, frame count (declared or estimated, else None), fps, codec, crf and the streams."""
    av = _import_av()
    src, dst = Path(src), Path(dst)
    fmt, codec, crf = _check_request(av, src, dst, codec, crf)
    inp = _open_input(av, src)
    try:
        in_v = _video_stream(src, inp)
        rate = _frame_rate(in_v)
        with av.open(io.BytesIO(), "w", format=fmt) as out:
            _add_video_stream(out, in_v, dst, codec, crf, rate)
            copied, skipped = _copy_streams(av, inp, in_v, out, dst, codec)
        audio = sum(1 for i in copied if inp.streams[i].type == "audio")
        return {
            "input": str(src),
            "output": str(dst),
            "width": in_v.codec_context.width,
            "height": in_v.codec_context.height,
            "frames": _total_frames(inp, in_v, rate),
            "fps": float(rate) if rate else None,
            "codec": codec,
            "crf": crf,
            "audio_streams": audio,
            "subtitle_streams": len(copied) - audio,
            "skipped_streams": skipped,
        }
    finally:
        inp.close()


def upscale_video(
    src: str | Path,
    dst: str | Path,
    upscale_rgb: UpscaleRGB | FrameMapper,
    *,
    codec: str | None = None,
    crf: float | None = None,
    progress: Progress | None = None,
    say: Say | None = None,
) -> dict[str, Any]:
    """Upscale every frame of ``src``'s first video stream with ``upscale_rgb`` and write ``dst``.

    ``upscale_rgb(rgb)`` takes an H x W x 3 float32 RGB frame in [0, 1] and returns the sH x sW x 3
    float32 result (not clipped); the scale s is read from the first frame's result. A
    :class:`FrameMapper` instead keeps several frames in flight (frames are still encoded in order).
    ``codec`` is the
    video encoder (default: :func:`default_codec`), ``crf`` its constant-quality setting (default
    :data:`DEFAULT_CRF` of the encoder; an encoder without a crf option takes none).
    ``progress(done, total)`` is called after each frame, ``total`` being the frame count the input
    declares or its duration times its frame rate, or None when neither is known. ``say(message)``
    reports the streams that are not copied.

    Errors the user can fix (those :func:`probe_video` finds, and unreadable data further in) raise
    :class:`RefQSRError`; an error raised by ``upscale_rgb`` propagates unchanged. In every failure
    DST is left as it was and the temp file is removed. Returns the run's report.
    """
    t_start = time.perf_counter()
    say = say or (lambda _msg: None)
    av = _import_av()
    src, dst = Path(src), Path(dst)
    fmt, codec, crf = _check_request(av, src, dst, codec, crf)
    inp = _open_input(av, src)
    try:
        in_v = _video_stream(src, inp)
        tmp = _make_temp(dst)
        try:
            report = _transcode(av, inp, in_v, src, dst, tmp, fmt, codec, crf, upscale_rgb, progress, say)
            publish(tmp, dst)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
    finally:
        inp.close()
    total = time.perf_counter() - t_start
    report["seconds"]["total"] = round(total, 3)
    report["frames_per_second"] = round(report["frames"] / total, 3) if total > 0 else None
    return report


def _check_request(av, src: Path, dst: Path, codec: str | None, crf: float | None) -> tuple[str, str, float | None]:
    """The output muxer, the encoder's name and the crf, once the paths and options are checked."""
    fmt = _check_output(dst)
    codec = _check_codec(av, codec or default_codec(dst))
    crf = _check_crf(av, codec, crf)
    if not src.is_file():
        raise RefQSRError(f"{src}: no such file" if not src.exists() else f"{src} is not a file")
    if dst.exists() and dst.resolve() == src.resolve():
        raise RefQSRError(f"output {dst} is the input: choose another output file")
    return fmt, codec, crf


def _open_input(av, src: Path):
    try:
        return av.open(str(src))
    except (av.error.FFmpegError, ValueError) as e:
        raise RefQSRError(f"{src}: not a video FFmpeg can read ({_why(e)})") from None


def _import_av():
    try:
        import av
    except ImportError:
        raise RefQSRError(f"video needs PyAV {MIN_PYAV} or newer (the video extra): pip install av") from None
    if int(av.__version__.split(".")[0]) < MIN_PYAV:
        raise RefQSRError(f"video needs PyAV {MIN_PYAV} or newer, not {av.__version__}: pip install -U av")
    return av


def _why(e: BaseException) -> str:
    """One line of an FFmpeg / PyAV error: its message without the errno prefix and file name."""
    text = getattr(e, "strerror", None) or str(e)
    return " ".join(str(text).split())


def _check_output(dst: Path) -> str:
    suffix = dst.suffix.lower()
    if suffix not in _MUXERS:
        known = " ".join(sorted(VIDEO_EXTENSIONS))
        raise RefQSRError(f"{dst}: unknown video container {dst.suffix or '(no suffix)'!r}; use one of {known}")
    if not dst.parent.is_dir():
        raise RefQSRError(f"output folder does not exist: {dst.parent}")
    if dst.is_dir():
        raise RefQSRError(f"output is a folder: {dst}")
    if not os.access(dst.parent, os.W_OK | os.X_OK):
        raise RefQSRError(f"output folder is not writable: {dst.parent}")
    return _MUXERS[suffix]


def _check_codec(av, name: str) -> str:
    try:
        codec = av.Codec(name, "w")
    except (ValueError, av.error.FFmpegError):
        have = [c for c in ("libx264", "libx265", "libvpx-vp9", "libsvtav1", "mpeg4") if c in av.codecs_available]
        raise RefQSRError(
            f"video encoder {name!r} is not available in this PyAV build; available: {', '.join(have)}"
        ) from None
    if codec.type != "video":
        raise RefQSRError(f"{name!r} encodes {codec.type}, not video: choose a video encoder such as libx264")
    return codec.name


def _crf_option(av, codec: str):
    ctx = av.Codec(codec, "w").create()
    return next((o for o in ctx.supported_options.private if o.name == "crf"), None)


def _check_crf(av, codec: str, crf: float | None) -> float | None:
    option = _crf_option(av, codec)
    if option is None:
        if crf is not None:
            raise RefQSRError(f"encoder {codec} has no crf setting: leave out --crf or choose libx264 / libvpx-vp9")
        return None
    if crf is None:
        return DEFAULT_CRF.get(codec)
    from av.codec.context import OptionType

    top = 51.0 if codec in ("libx264", "libx265") else option.max
    if not 0 <= crf <= top:
        raise RefQSRError(f"--crf {crf:g} is out of range for {codec} (0 to {top:g})")
    whole = float(crf).is_integer()
    if option.type == OptionType.INT and not whole:
        raise RefQSRError(f"--crf for {codec} is a whole number, not {crf:g}")
    return int(crf) if whole else float(crf)


def _video_stream(src: Path, inp):
    """The stream to upscale: the first video stream that is not a cover picture."""
    name = inp.format.name
    if name == "image2" or name.endswith("_pipe"):
        raise RefQSRError(f"{src} is an image ({name.removesuffix('_pipe')}), not a video")
    for stream in inp.streams.video:
        if not stream.disposition & stream.disposition.attached_pic:
            return stream
    raise RefQSRError(f"{src} has no video stream")


def _make_temp(dst: Path) -> str:
    name = f".{dst.name}"
    remove_stale_temps(dst.parent, name)
    try:
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=owned_temp_prefix(name))
    except OSError as e:
        raise RefQSRError(f"cannot write to {dst.parent}: {e.strerror or e}") from None
    os.close(fd)
    return tmp


def _describe(stream) -> str:
    ctx = stream.codec_context
    name = ctx.name if ctx is not None else stream.metadata.get("filename") or getattr(stream, "name", None)
    return f"{stream.type} stream #{stream.index} ({name or 'no codec'})"


def _frame_rate(in_v) -> Fraction | None:
    for rate in (in_v.average_rate, in_v.guessed_rate, in_v.base_rate):
        if rate:
            return Fraction(rate)
    return None


def _total_frames(inp, in_v, rate: Fraction | None) -> int | None:
    if in_v.frames and in_v.frames > 0:
        return int(in_v.frames)
    if rate:
        if in_v.duration and in_v.time_base:
            return max(1, round(in_v.duration * in_v.time_base * rate))
        if inp.duration:
            return max(1, round(Fraction(inp.duration, 1_000_000) * rate))
    return None


def _carriers(av, codecs: list[str]) -> list[str]:
    """The output suffixes whose container can carry every codec in ``codecs``."""
    out = []
    for suffix, muxer in _MUXERS.items():
        if muxer in {_MUXERS[s] for s in out}:
            continue
        try:
            with av.open(io.BytesIO(), "w", format=muxer) as probe:
                supported = probe.supported_codecs
        except (ValueError, av.error.FFmpegError):
            continue
        if all(c in supported for c in codecs):
            out.append(suffix)
    return out


def _copy_streams(av, inp, in_v, out, dst: Path, codec: str) -> tuple[dict[int, Any], list[str]]:
    """Add an output stream for every audio and subtitle stream (and, where the container takes
    them, attachments): {input index: output stream}, and the descriptions of the streams left out."""
    copied: dict[int, Any] = {}
    skipped: list[str] = []
    for stream in inp.streams:
        if stream is in_v:
            continue
        kept = ("audio", "subtitle", "attachment") if out.format.name == "matroska" else ("audio", "subtitle")
        if stream.type not in kept:  # only Matroska holds attachments (fonts of ASS subtitles)
            skipped.append(_describe(stream))
            continue
        try:
            out_s = out.add_stream_from_template(stream)
        except (ValueError, av.error.FFmpegError):
            if stream.type == "attachment":
                skipped.append(_describe(stream))
                continue
            name = stream.codec_context.name if stream.codec_context is not None else "unknown"
            needed = [codec] + [
                s.codec_context.name
                for s in inp.streams
                if s.type in ("audio", "subtitle") and s.codec_context is not None
            ]
            where = [s for s in _carriers(av, needed) if s != dst.suffix.lower()]
            hint = f"write a {' or '.join(where)} file instead" if where else "no output container carries all streams"
            raise RefQSRError(
                f"{_describe(stream)} cannot be copied into a {dst.suffix} file ({out.format.name} takes no {name}): "
                f"{hint}"
            ) from None
        out_s.metadata.update((k, v) for k, v in stream.metadata.items() if k.lower() not in _FILE_TAGS)
        with suppress(AttributeError, ValueError, TypeError):
            out_s.disposition = stream.disposition
        if stream.type != "attachment":
            copied[stream.index] = out_s
    return copied, skipped


# FFmpeg colour matrix (AVColorSpace) -> the swscale matrix that converts it.
_SWS_MATRIX = {1: "itu709", 4: "fcc", 5: "itu601", 6: "itu601", 7: "smpte240m", 9: "bt2020", 10: "bt2020"}


class _Encoder:
    """The output video stream, set up from the first upscaled frame (its size gives the scale)."""

    def __init__(self, av, out, stream, in_v, first, sr_shape, fmt: str, rate: Fraction | None):
        self.av = av
        self.out = out
        self.stream = stream
        self.in_tb = in_v.time_base
        h, w = sr_shape[:2]
        if w % 2 or h % 2:
            raise RefQSRError(f"the upscaled frame is {w}x{h}; {PIX_FMT} needs even width and height")
        ctx = stream.codec_context
        ctx.width, ctx.height, ctx.pix_fmt = w, h, PIX_FMT
        # AVI keeps no timestamps, only a frame count: its frames sit on the 1/rate grid.
        self.cfr = fmt == "avi"
        self.tb = Fraction(1) / rate if self.cfr and rate else self.in_tb
        ctx.time_base = self.tb
        stream.time_base = self.tb
        if self.cfr:
            ctx.max_b_frames = 0  # AVI stores frames in decoding order with no timestamps to reorder them by
        if rate:
            ctx.framerate = rate
        self.matrix = _SWS_MATRIX.get(first.colorspace, "itu601")
        self.range = first.color_range or None
        for tag in ("colorspace", "color_range", "color_primaries", "color_trc"):
            with suppress(AttributeError, ValueError, TypeError, OverflowError):
                setattr(ctx, tag, getattr(first, tag))
        sar = in_v.codec_context.sample_aspect_ratio
        if sar and sar != 1:
            with suppress(AttributeError, ValueError, TypeError):
                ctx.sample_aspect_ratio = sar
        _copy_display_matrix(first, stream)
        try:
            ctx.open()
        except (av.error.FFmpegError, ValueError) as e:
            raise RefQSRError(f"the {ctx.name} encoder does not start for {w}x{h} video: {_why(e)}") from None
        self.step = max(1, round(1 / (rate * self.in_tb))) if rate and self.in_tb else 1
        self.last_pts: int | None = None

    def pts(self, frame) -> int:
        """The frame's timestamp in the output time base, strictly increasing (the encoders require it)."""
        pts = frame.pts
        if pts is None:
            pts = (self.last_pts + self.step) if self.last_pts is not None else 0
            if self.cfr:
                pts = (self.last_pts + 1) if self.last_pts is not None else 0
        elif self.cfr:
            pts = round(pts * self.in_tb / self.tb)
        if self.last_pts is not None and pts <= self.last_pts:
            pts = self.last_pts + 1
        self.last_pts = pts
        return pts

    def encode(self, sr: np.ndarray, pts: int) -> None:
        rgb = np.clip(np.rint(sr * 255.0), 0, 255).astype(np.uint8)
        frame = self.av.VideoFrame.from_ndarray(rgb, format="rgb24")
        yuv = frame.reformat(format=PIX_FMT, dst_colorspace=self.matrix, dst_color_range=self.range)
        yuv.pts = pts
        yuv.time_base = self.tb
        self.out.mux(self.stream.encode(yuv))

    def flush(self) -> None:
        self.out.mux(self.stream.encode(None))


def _copy_display_matrix(frame, stream) -> None:
    """Carry the source's display matrix (a phone video's rotation) to the output stream."""
    try:
        side = frame.side_data.get("DISPLAYMATRIX")
        if side is not None:
            stream.set_display_matrix(np.frombuffer(bytes(side), dtype=np.int32)[:9].tolist())
            return
    except (AttributeError, KeyError, TypeError, ValueError):
        pass
    with suppress(AttributeError, TypeError, ValueError):
        if frame.rotation:
            stream.set_display_rotation(frame.rotation)


def _to_rgb(frame, width: int, height: int) -> np.ndarray:
    """The frame as H x W x 3 float32 RGB in [0, 1], at the first frame's size; 16-bit RGB for a
    source of more than 8 bits per component, so that none of its precision is lost before upscaling."""
    deep = any(c.bits > 8 for c in frame.format.components)
    arr = frame.to_ndarray(width=width, height=height, format="rgb48le" if deep else "rgb24")
    return arr.astype(np.float32) * np.float32(1.0 / (65535.0 if deep else 255.0))


def _add_video_stream(out, in_v, dst: Path, codec: str, crf: float | None, rate: Fraction | None):
    """The output's video stream (its size is set from the first upscaled frame)."""
    try:
        out_v = out.add_stream(codec, rate=rate, time_base=in_v.time_base)
    except ValueError:
        raise RefQSRError(f"a {dst.suffix} file cannot hold {codec} video: choose another --codec") from None
    options = {"crf": str(crf)} if crf is not None else {}
    if codec == "libx265":
        options["x265-params"] = "log-level=error"  # x265 prints its settings to stderr otherwise
    out_v.codec_context.options = options
    out_v.metadata.update(
        (k, v) for k, v in in_v.metadata.items() if not k.lower().startswith(_VIDEO_STREAM_TAGS_DROPPED)
    )
    return out_v


def _transcode(av, inp, in_v, src, dst, tmp, fmt, codec, crf, upscale_rgb, progress, say) -> dict[str, Any]:
    seconds = {"decode": 0.0, "upscale": 0.0, "encode": 0.0}
    rate = _frame_rate(in_v)
    total = _total_frames(inp, in_v, rate)
    try:
        out = av.open(tmp, "w", format=fmt)
    except (av.error.FFmpegError, ValueError) as e:
        raise RefQSRError(f"cannot write {dst}: {_why(e)}") from None
    try:
        out_v = _add_video_stream(out, in_v, dst, codec, crf, rate)
        copied, skipped = _copy_streams(av, inp, in_v, out, dst, codec)
        out.metadata.update((k, v) for k, v in inp.metadata.items() if k.lower() not in _FILE_TAGS)
        with suppress(AttributeError, ValueError, TypeError, av.error.FFmpegError):
            out.set_chapters(inp.chapters())
        for line in skipped:
            say(f"{src}: {line} is not copied")
        in_v.thread_type = "AUTO"
        report = _run(av, inp, in_v, out, out_v, copied, fmt, rate, total, upscale_rgb, progress, seconds, src, dst)
        t = time.perf_counter()
        out.close()
        seconds["encode"] += time.perf_counter() - t
    except av.error.FFmpegError as e:
        with suppress(Exception):
            out.close()
        raise RefQSRError(f"{src} -> {dst}: {_why(e)}") from None
    except BaseException:
        with suppress(Exception):
            out.close()
        raise
    audio = sum(1 for i in copied if inp.streams[i].type == "audio")
    report.update(
        input=str(src),
        output=str(dst),
        fps=float(rate) if rate else None,
        time_base=str(in_v.time_base),
        codec=codec,
        crf=crf,
        pix_fmt=PIX_FMT,
        audio_streams_copied=audio,
        subtitle_streams_copied=len(copied) - audio,
        skipped_streams=skipped,
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )
    return report


def _run(av, inp, in_v, out, out_v, copied, fmt, rate, total, upscale_rgb, progress, seconds, src, dst):
    """The one pass: demux every stream in file order, decode and upscale the video, copy the rest.
    Frames go to ``upscale_rgb`` (a function, or a :class:`FrameMapper` that keeps up to ``window``
    frames in flight) and are encoded in their decoding order."""
    mapper = upscale_rgb if hasattr(upscale_rgb, "submit") else _Synchronous(upscale_rgb)
    encoder: _Encoder | None = None
    pending = []  # copied packets read before the first frame sets the output up (a few, at the start)
    in_flight: deque = deque()  # (decoded frame, handle of its upscale), in decoding order
    size = (0, 0)
    sr_size = (0, 0)
    done = 0

    def finish_oldest() -> None:
        nonlocal encoder, sr_size, done
        frame, handle = in_flight.popleft()
        t_up = time.perf_counter()
        sr = mapper.result(handle)
        t_enc = time.perf_counter()
        seconds["upscale"] += t_enc - t_up
        if encoder is None:
            sr_size = (sr.shape[1], sr.shape[0])
            encoder = _Encoder(av, out, out_v, in_v, frame, sr.shape, fmt, rate)
            for held in pending:
                out.mux(held)
            pending.clear()
        elif (sr.shape[1], sr.shape[0]) != sr_size:
            raise RefQSRError(f"upscale_rgb returned {sr.shape[1]}x{sr.shape[0]} after {sr_size[0]}x{sr_size[1]}")
        encoder.encode(sr, encoder.pts(frame))
        seconds["encode"] += time.perf_counter() - t_enc
        done += 1
        if progress is not None:
            progress(done, total)

    reading = [in_v, *(inp.streams[i] for i in copied)]
    demux = inp.demux(*reading)
    while True:
        t = time.perf_counter()
        packet = next(demux, None)
        if packet is None:
            seconds["decode"] += time.perf_counter() - t
            break
        if packet.stream.index != in_v.index:
            seconds["decode"] += time.perf_counter() - t
            if packet.dts is None and packet.size == 0:
                continue  # the demuxer's end-of-stream marker
            packet.stream = copied[packet.stream.index]
            if encoder is None:
                pending.append(packet)
            else:
                t = time.perf_counter()
                out.mux(packet)
                seconds["encode"] += time.perf_counter() - t
            continue
        frames = in_v.decode(packet)
        seconds["decode"] += time.perf_counter() - t
        for frame in frames:
            t = time.perf_counter()
            if size == (0, 0):
                size = (frame.width, frame.height)
            rgb = _to_rgb(frame, *size)
            t_up = time.perf_counter()
            seconds["decode"] += t_up - t
            in_flight.append((frame, mapper.submit(rgb)))
            seconds["upscale"] += time.perf_counter() - t_up
            del rgb
            while len(in_flight) > mapper.window:
                finish_oldest()
    while in_flight:
        finish_oldest()
    if encoder is None:
        raise RefQSRError(f"{src}: no video frame could be decoded")
    t = time.perf_counter()
    encoder.flush()
    seconds["encode"] += time.perf_counter() - t
    return {
        "frames": done,
        "width_in": size[0],
        "height_in": size[1],
        "width_out": sr_size[0],
        "height_out": sr_size[1],
        "scale": sr_size[0] / size[0] if size[0] else None,
    }
