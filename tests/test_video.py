"""engine/video: frames, frame rate, timestamps, copied audio / subtitles, errors, atomic output.

The clips are made here with PyAV (tiny: 32 x 24 px, about a second). The upscaler is numpy's
nearest-neighbour x4 (``np.repeat``), not the engine: the engine's own output is tested elsewhere;
these tests check the video plumbing around any ``upscale_rgb``.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from refqsr_engine.engine.video import VIDEO_EXTENSIONS, is_video, probe_video, upscale_video  # noqa: E402
from refqsr_engine.errors import RefQSRError  # noqa: E402

W, H = 32, 24
SAMPLE_RATE = 48000


def nearest4(rgb: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(rgb, 4, axis=0), 4, axis=1)


def _picture(i: int) -> np.ndarray:
    """A smooth gradient with a square that moves: content a lossy codec keeps well."""
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = np.linspace(16, 235, W, dtype=np.float32)[None].astype(np.uint8)
    img[..., 1] = np.linspace(235, 16, H, dtype=np.float32)[:, None].astype(np.uint8)
    img[..., 2] = (60 + 12 * i) % 256
    x = 2 + (2 * i) % (W - 10)
    img[8:16, x : x + 8] = (230, 200, 40)
    return img


def make_clip(
    path: Path,
    *,
    rate: Fraction = Fraction(10),
    frames: int = 12,
    audio: str | None = "aac",
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    subtitles: list[tuple[int, bytes]] | None = None,
    rotation: int = 0,
) -> Path:
    """An H.264 yuv420p clip of ``frames`` frames; ``pts`` (in ``time_base``) for a variable rate,
    an audio track (a 440 Hz sine) in ``audio``'s codec, SubRip ``subtitles`` as (ms, text)."""
    out = av.open(str(path), "w")
    video = out.add_stream("libx264", rate=rate)
    video.width, video.height, video.pix_fmt = W, H, "yuv420p"
    tb = time_base or Fraction(1) / rate
    video.codec_context.time_base = tb
    if rotation:
        video.set_display_rotation(rotation)
    sound = out.add_stream(audio, rate=SAMPLE_RATE) if audio else None
    if sound is not None:
        sound.layout = "mono"
    subs = out.add_mux_stream("subrip") if subtitles else None
    if subs is not None:
        subs.time_base = Fraction(1, 1000)
    stamps = pts if pts is not None else list(range(frames))
    for i, stamp in enumerate(stamps):
        frame = av.VideoFrame.from_ndarray(_picture(i), format="rgb24")
        frame.pts, frame.time_base = stamp, tb
        out.mux(video.encode(frame))
    out.mux(video.encode())
    if sound is not None:
        seconds = float((stamps[-1] + 1) * tb)
        t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
        wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for start in range(0, len(wave), 1024):
            chunk = av.AudioFrame.from_ndarray(wave[None, start : start + 1024], format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = SAMPLE_RATE, start, Fraction(1, SAMPLE_RATE)
            out.mux(sound.encode(chunk))
        out.mux(sound.encode())
    for ms, text in subtitles or []:
        packet = av.Packet(text)
        packet.stream = subs
        packet.pts = packet.dts = ms
        packet.duration, packet.time_base = 400, Fraction(1, 1000)
        out.mux(packet)
    out.close()
    return path


def decoded(path: Path) -> list:
    """(pts, rgb24 array) of every frame of the first video stream."""
    with av.open(str(path)) as c:
        return [(f.pts, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]


def packets(path: Path, kind: str) -> list[tuple[int | None, bytes]]:
    """(pts in ms, bytes) of every packet of the first ``kind`` stream."""
    with av.open(str(path)) as c:
        stream = getattr(c.streams, kind)[0]
        return [
            (round(p.pts * p.time_base * 1000) if p.pts is not None else None, bytes(p))
            for p in c.demux(stream)
            if p.size
        ]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def check_video(src: Path, dst: Path, *, same_time_base: bool = True) -> None:
    """Frame count, frame rate, timestamps, size x4 and content of ``dst`` against ``src``."""
    with av.open(str(src)) as a, av.open(str(dst)) as b:
        va, vb = a.streams.video[0], b.streams.video[0]
        assert (vb.width, vb.height) == (4 * va.width, 4 * va.height)
        assert vb.average_rate == va.average_rate
        if same_time_base:
            assert vb.time_base == va.time_base
        frame = float(1 / va.average_rate)
        assert abs(b.duration - a.duration) / 1e6 <= frame
    ins, outs = decoded(src), decoded(dst)
    assert len(outs) == len(ins)
    tb_in, tb_out = _video_tb(src), _video_tb(dst)
    for (pa, ra), (pb, rb) in zip(ins, outs):
        assert abs(float(pa * tb_in) - float(pb * tb_out)) < 0.002
        assert psnr(nearest4(ra), rb) > 30


def _video_tb(path: Path) -> Fraction:
    with av.open(str(path)) as c:
        return c.streams.video[0].time_base


def test_video_extensions() -> None:
    assert {".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v"} <= VIDEO_EXTENSIONS
    assert is_video("a/b.MP4") and is_video(Path("x.webm"))
    assert not is_video("x.png") and not is_video("mp4")


def test_mp4_frames_rate_audio_and_progress(tmp_path: Path) -> None:
    src = make_clip(tmp_path / "in.mp4", rate=Fraction(10), frames=12)
    dst = tmp_path / "out.mp4"
    calls = []
    report = upscale_video(src, dst, nearest4, progress=lambda n, total: calls.append((n, total)))
    check_video(src, dst)
    assert calls == [(n, 12) for n in range(1, 13)]
    with av.open(str(src)) as a, av.open(str(dst)) as b:
        sa, sb = a.streams.audio[0], b.streams.audio[0]
        assert sb.codec_context.name == sa.codec_context.name == "aac"
        assert sb.codec_context.sample_rate == sa.codec_context.sample_rate == SAMPLE_RATE
    assert packets(dst, "audio") == packets(src, "audio")  # copied unchanged, timestamps included
    assert report["frames"] == 12 and report["fps"] == 10.0
    assert (report["width_in"], report["height_in"], report["width_out"], report["height_out"]) == (W, H, 4 * W, 4 * H)
    assert report["codec"] == "libx264" and report["crf"] == 18
    assert report["audio_streams_copied"] == 1 and report["subtitle_streams_copied"] == 0
    assert set(report["seconds"]) == {"decode", "upscale", "encode", "total"}
    assert report["frames_per_second"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]


def test_fractional_rate_keeps_rate_and_time_base(tmp_path: Path) -> None:
    rate = Fraction(30000, 1001)
    src = make_clip(
        tmp_path / "in.mp4", rate=rate, frames=36, time_base=Fraction(1, 30000), pts=[1001 * i for i in range(36)]
    )
    dst = tmp_path / "out.mp4"
    report = upscale_video(src, dst, nearest4, crf=20)
    check_video(src, dst)
    assert _video_tb(dst) == Fraction(1, 30000)
    assert report["fps"] == pytest.approx(30000 / 1001) and report["crf"] == 20
    assert packets(dst, "audio") == packets(src, "audio")


def test_mkv_variable_rate_start_offset_opus_and_subtitles(tmp_path: Path) -> None:
    """Irregular timestamps from 500 ms on survive, and the Opus and SubRip packets are copied."""
    stamps = [500, 600, 650, 800, 1000, 1033, 1100, 1300]
    subtitles = [(500, b"hello"), (900, b"world")]
    src = make_clip(tmp_path / "in.mkv", pts=stamps, time_base=Fraction(1, 1000), audio="libopus", subtitles=subtitles)
    dst = tmp_path / "out.mkv"
    report = upscale_video(src, dst, nearest4)
    assert [p for p, _ in decoded(dst)] == stamps
    assert [psnr(nearest4(a), b) > 30 for (_, a), (_, b) in zip(decoded(src), decoded(dst))] == [True] * len(stamps)
    assert packets(dst, "audio") == packets(src, "audio")
    assert packets(dst, "subtitles") == packets(src, "subtitles") == subtitles
    assert report["audio_streams_copied"] == 1 and report["subtitle_streams_copied"] == 1
    with av.open(str(dst)) as c:
        assert c.streams.audio[0].codec_context.name == "opus"


def test_webm_defaults_to_vp9(tmp_path: Path) -> None:
    src = make_clip(tmp_path / "in.mkv", frames=8, audio="libopus")
    dst = tmp_path / "out.webm"
    report = upscale_video(src, dst, nearest4)
    assert report["codec"] == "libvpx-vp9" and report["crf"] == 32
    check_video(src, dst, same_time_base=False)  # WebM counts time in milliseconds
    with av.open(str(dst)) as c:
        assert c.streams.video[0].codec_context.name in ("vp9", "libvpx-vp9")
    assert packets(dst, "audio") == packets(src, "audio")


def test_colour_tags_and_rotation_survive(tmp_path: Path) -> None:
    """A BT.709 full-range rotated source: the same tags and rotation on the output, and with an
    identity "upscaler" at crf 0 the YUV samples come back within the rounding of the RGB round trip."""
    src = tmp_path / "in.mkv"
    out = av.open(str(src), "w")
    video = out.add_stream("libx264", rate=10)
    video.width, video.height, video.pix_fmt = W, H, "yuv420p"
    ctx = video.codec_context
    ctx.colorspace = ctx.color_primaries = ctx.color_trc = 1  # BT.709
    ctx.color_range = 2  # full
    video.set_display_rotation(90)
    for i in range(4):
        frame = av.VideoFrame.from_ndarray(_picture(i), format="rgb24")
        frame = frame.reformat(format="yuv420p", dst_colorspace="itu709", dst_color_range=2)
        frame.pts, frame.time_base = i, Fraction(1, 10)
        out.mux(video.encode(frame))
    out.mux(video.encode())
    out.close()
    dst = tmp_path / "out.mkv"
    upscale_video(src, dst, lambda rgb: rgb, crf=0)
    with av.open(str(src)) as a, av.open(str(dst)) as b:
        fa, fb = next(a.decode(video=0)), next(b.decode(video=0))
        tags = ("colorspace", "color_range", "color_primaries", "color_trc", "rotation")
        assert [getattr(fb, t) for t in tags] == [getattr(fa, t) for t in tags] == [1, 2, 1, 1, 90]
        ya, yb = fa.to_ndarray(format="yuv420p"), fb.to_ndarray(format="yuv420p")
        # chroma subsampling and 8-bit RGB cost about one level on average; a wrong matrix or range costs 6+
        assert np.abs(ya.astype(int) - yb.astype(int)).mean() < 1.5


def test_user_errors(tmp_path: Path) -> None:
    from PIL import Image

    src = make_clip(tmp_path / "in.mp4", frames=3)
    png = tmp_path / "still.png"
    Image.fromarray(_picture(0)).save(png)
    text = tmp_path / "notes.txt"
    text.write_text("not a video")
    cases = [
        (tmp_path / "missing.mp4", tmp_path / "o.mp4", {}, "no such file"),
        (png, tmp_path / "o.mp4", {}, "is an image"),
        (text, tmp_path / "o.mp4", {}, "not a video"),
        (src, tmp_path / "o.xyz", {}, "unknown video container"),
        (src, tmp_path / "o.mp4", {"codec": "no-such-codec"}, "not available"),
        (src, tmp_path / "o.mp4", {"codec": "aac"}, "not video"),
        (src, tmp_path / "o.mp4", {"codec": "mpeg4", "crf": 20}, "no crf"),
        (src, tmp_path / "o.mp4", {"crf": 70}, "out of range"),
        (src, tmp_path / "o.webm", {"codec": "libx264"}, "cannot hold libx264"),
        (src, tmp_path / "o.webm", {}, "write a .mp4"),  # AAC has no place in WebM
        (src, text / "o.mp4", {}, "output folder does not exist"),
        (src, tmp_path, {}, "unknown video container"),
        (src, tmp_path / "sub.mp4", {}, "output is a folder"),
        (src, src, {}, "is the input"),
    ]
    (tmp_path / "sub.mp4").mkdir()
    for s, d, kwargs, words in cases:
        for call, args in ((upscale_video, (s, d, nearest4)), (probe_video, (s, d))):
            with pytest.raises(RefQSRError, match=words) as err:
                call(*args, **kwargs)
            assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "notes.txt", "still.png", "sub.mp4"]


def test_probe_reports_without_writing(tmp_path: Path) -> None:
    src = make_clip(tmp_path / "in.mkv", frames=12, audio="libopus", subtitles=[(0, b"hi")])
    info = probe_video(src, tmp_path / "out.mkv", crf=21)
    assert (info["width"], info["height"], info["frames"], info["fps"]) == (W, H, 12, 10.0)
    assert (info["codec"], info["crf"], info["audio_streams"], info["subtitle_streams"]) == ("libx264", 21, 1, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mkv"]


def test_subtitles_the_output_cannot_carry_are_an_error(tmp_path: Path) -> None:
    src = make_clip(tmp_path / "in.mkv", frames=3, audio=None, subtitles=[(0, b"hi")])
    with pytest.raises(RefQSRError, match=r"subtitle stream #1 .* \.mp4 .*\.mkv"):
        upscale_video(src, tmp_path / "out.mp4", nearest4)
    assert not (tmp_path / "out.mp4").exists()


def _failing_after(n: int):
    done = []

    def upscale(rgb: np.ndarray) -> np.ndarray:
        if len(done) == n:
            raise RuntimeError("engine failed")
        done.append(1)
        return nearest4(rgb)

    return upscale


def test_failure_mid_video_leaves_nothing(tmp_path: Path) -> None:
    src = make_clip(tmp_path / "in.mp4", frames=12)
    dst = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="engine failed"):
        upscale_video(src, dst, _failing_after(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def test_failure_keeps_an_existing_output(tmp_path: Path) -> None:
    src = make_clip(tmp_path / "in.mp4", frames=12)
    dst = tmp_path / "out.mp4"
    dst.write_bytes(b"the previous output")
    with pytest.raises(RuntimeError):
        upscale_video(src, dst, _failing_after(7))
    assert dst.read_bytes() == b"the previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]
    upscale_video(src, dst, nearest4)  # success replaces it
    check_video(src, dst)


def test_stale_temp_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    src = make_clip(tmp_path / "in.mp4", frames=3)
    pid = 2**22 + 12345  # above Linux's pid_max: no such process
    stale = tmp_path / f".out.mp4.{pid}.tmp-abc"
    stale.write_bytes(b"left by a killed run")
    upscale_video(src, tmp_path / "out.mp4", nearest4)
    assert not stale.exists()
    assert (tmp_path / "out.mp4").exists()
    assert os.stat(tmp_path / "out.mp4").st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_attachments_go_to_matroska_only_and_skips_are_reported(tmp_path: Path) -> None:
    src = tmp_path / "in.mkv"
    out = av.open(str(src), "w")
    video = out.add_stream("libx264", rate=10)
    video.width, video.height = W, H
    out.add_attachment("font.ttf", "application/x-truetype-font", b"\0font data")
    for i in range(3):
        frame = av.VideoFrame.from_ndarray(_picture(i), format="rgb24")
        frame.pts, frame.time_base = i, Fraction(1, 10)
        out.mux(video.encode(frame))
    out.mux(video.encode())
    out.close()
    upscale_video(src, tmp_path / "out.mkv", nearest4)
    with av.open(str(tmp_path / "out.mkv")) as c:
        [attachment] = c.streams.attachments
        assert attachment.data == b"\0font data" and attachment.metadata["filename"] == "font.ttf"
    said: list[str] = []
    report = upscale_video(src, tmp_path / "out.mp4", nearest4, say=said.append)
    assert report["skipped_streams"] == ["attachment stream #1 (font.ttf)"]
    assert said == [f"{src}: attachment stream #1 (font.ttf) is not copied"]


def test_tags_chapters_dispositions_and_aspect_ratio_are_kept(tmp_path: Path) -> None:
    src = tmp_path / "in.mkv"
    out = av.open(str(src), "w")
    out.metadata["title"] = "A film"
    video = out.add_stream("libx264", rate=10)
    video.width, video.height = W, H
    video.codec_context.sample_aspect_ratio = Fraction(4, 3)
    sound = out.add_stream("aac", rate=SAMPLE_RATE)
    sound.layout = "mono"
    sound.metadata.update(language="fre", title="Commentary")
    sound.disposition = av.stream.Disposition.default | av.stream.Disposition.forced
    chapters = [(0, 200, "One"), (200, 500, "Two")]
    out.set_chapters(
        [
            {"id": i, "start": a, "end": b, "time_base": Fraction(1, 1000), "metadata": {"title": t}}
            for i, (a, b, t) in enumerate(chapters, 1)
        ]
    )
    for i in range(5):
        frame = av.VideoFrame.from_ndarray(_picture(i), format="rgb24")
        frame.pts, frame.time_base = i, Fraction(1, 10)
        out.mux(video.encode(frame))
    out.mux(video.encode())
    for start in range(0, SAMPLE_RATE // 2, 1024):
        chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        chunk.sample_rate, chunk.pts, chunk.time_base = SAMPLE_RATE, start, Fraction(1, SAMPLE_RATE)
        out.mux(sound.encode(chunk))
    out.mux(sound.encode())
    out.close()
    dst = tmp_path / "out.mkv"
    upscale_video(src, dst, nearest4)
    with av.open(str(dst)) as c:
        assert c.metadata["title"] == "A film"
        assert [(ch["metadata"]["title"], float(ch["start"] * ch["time_base"])) for ch in c.chapters()] == [
            ("One", 0.0),
            ("Two", 0.2),
        ]
        assert c.streams.video[0].codec_context.sample_aspect_ratio == Fraction(4, 3)
        audio = c.streams.audio[0]
        assert (audio.metadata["language"], audio.metadata["title"]) == ("fre", "Commentary")
        assert audio.disposition & av.stream.Disposition.forced
