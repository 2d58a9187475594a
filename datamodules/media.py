"""Media decoding and encoding with PyAV (FFmpeg); the one module that reads and writes video, audio and images.

Reading (bytes or a path in, torch tensors out):
  - `probe_video`, `probe_audio`, `probe_image`: container metadata without decoding the whole stream;
    `count_decodable_frames`: decode a whole video stream (the shard writer's check).
  - `decode_video`: frames sampled at a target fps, `num_frames` long, starting at `start` seconds. Frame k of
    the clip is the source frame nearest to t_k = start + k / fps (ties to the earlier one; a target fps
    above the native one repeats frames). Returns uint8 [T, H, W, 3] and the source frame indices.
  - `decode_audio`: float32 [C, S] in [-1, 1], resampled to `sample_rate` (libswresample), cut to
    [start, start + duration) and zero-padded to exactly round(duration * sample_rate) samples.
  - `decode_image`: uint8 [H, W, 3].
  - `resize_crop`: uint8 frames [T, H, W, 3] -> float32 [3, T, h, w] in [-1, 1] with torch ops: the crop box
    is the largest window of the target aspect ratio (centred, or placed by `offset`), then an antialiased
    bilinear resize to (h, w). Pixels map as x -> x / 127.5 - 1 (`frames_to_video`). `crop_resize_frames`
    stops before that conversion (the data pipeline ships uint8 frames from its workers, channels last as
    decoded, and converts them in the main process).

Writing (tensors in, bytes or files out):
  - `encode_video` / `write_video`: [3, T, H, W] in [-1, 1] -> mp4 (H.264, yuv420p, browser-playable) or webm
    (VP9, the MLflow-UI-safe choice), optionally with an audio track (AAC in mp4, Opus in webm).
    yuv420p needs even sides: odd sizes are padded by one replicated row/column.
  - `encode_audio` / `write_audio`: [C, S] in [-1, 1] -> wav (PCM s16) or flac.
  - `encode_image` / `write_image`: [3, H, W] (or [3, 1, H, W]) in [-1, 1] -> png or jpg.
  - `encode_frames`: the uint8 [T, H, W, 3] numpy variant used by the synthetic world and the benchmarks.

Every decoding failure raises `MediaDecodeError` whose `reason` is one of `UNDECODABLE`, `ZERO_LENGTH`,
`NO_STREAM`; the data pipeline counts samples by that reason.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

UNDECODABLE = "undecodable"
ZERO_LENGTH = "zero_length"
NO_STREAM = "no_stream"

Source = bytes | str | Path | BinaryIO


class MediaDecodeError(ValueError):
    """A media payload could not be decoded; `reason` classifies why (undecodable, zero_length, no_stream)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _open(source: Source) -> av.container.InputContainer:
    """Open bytes, a path or a file object for reading; raise MediaDecodeError if FFmpeg refuses it."""
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise MediaDecodeError(ZERO_LENGTH, "empty payload")
        source = io.BytesIO(source)
    elif isinstance(source, Path):
        source = str(source)
    try:
        return av.open(source, mode="r")
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise MediaDecodeError(UNDECODABLE, f"cannot open container ({exc})") from exc


# ----------------------------------------------------------------------------------------------------------------
# probing


@dataclass(frozen=True)
class VideoInfo:
    """Metadata of the first video stream (and the first audio stream, if any)."""

    width: int
    height: int
    fps: float
    num_frames: int
    duration: float
    audio_rate: int = 0
    audio_channels: int = 0

    @property
    def has_audio(self) -> bool:
        return self.audio_rate > 0


@dataclass(frozen=True)
class AudioInfo:
    """Metadata of the first audio stream."""

    sample_rate: int
    channels: int
    duration: float

    @property
    def num_samples(self) -> int:
        return int(round(self.duration * self.sample_rate))


def _stream_duration(stream: av.stream.Stream, container: av.container.InputContainer) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return 0.0


def probe_video(source: Source, decode_first_frame: bool = False) -> VideoInfo:
    """Read the video stream's size, fps, frame count and duration (seconds).

    The frame count comes from the container when it states one, else duration x fps. With
    `decode_first_frame` the first frame is decoded too, which catches files with a valid header but
    corrupt data (used when writing shards).
    """
    with _open(source) as container:
        if not container.streams.video:
            raise MediaDecodeError(NO_STREAM, "no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.base_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        duration = _stream_duration(stream, container)
        frames = int(stream.frames) if stream.frames else int(round(duration * fps))
        width, height = stream.codec_context.width, stream.codec_context.height
        audio_rate = audio_channels = 0
        if container.streams.audio:
            audio = container.streams.audio[0]
            audio_rate, audio_channels = int(audio.rate or 0), int(audio.channels or 0)
        if decode_first_frame:
            try:
                frame = next(container.decode(stream), None)
            except av.FFmpegError as exc:
                raise MediaDecodeError(UNDECODABLE, f"first frame: {exc}") from exc
            if frame is None:
                raise MediaDecodeError(ZERO_LENGTH, "no frames")
            width, height = frame.width, frame.height
    if frames <= 0 or duration <= 0 or fps <= 0:
        raise MediaDecodeError(ZERO_LENGTH, f"frames={frames} duration={duration:.3f}s fps={fps:.2f}")
    if width <= 0 or height <= 0:
        raise MediaDecodeError(UNDECODABLE, f"size {width}x{height}")
    return VideoInfo(width, height, fps, frames, duration, audio_rate, audio_channels)


def rgb_frame(frame: av.VideoFrame, width: int | None = None, height: int | None = None) -> np.ndarray:
    """A decoded frame as uint8 RGB [H, W, 3] (scaled to width x height if given), converted on this thread:
    `to_ndarray(format="rgb24")` starts scaler threads for every frame, which took half the time of decoding a
    small clip. The same pixels."""
    return frame.reformat(width=width, height=height, format="rgb24", threads=1).to_ndarray()


def scan_video(source: Source, thumbnail: int = 64) -> tuple[int, float]:
    """Decode every frame of the first video stream: (frames decoded, motion score). The motion score is
    `synthetic.world.motion_score` of the frames shrunk to thumbnail x thumbnail, mean |x_t − x_{t−1}| / 255,
    accumulated frame by frame so a long video never sits in memory (Animated Stickers' motion buckets). A frame
    that cannot be decoded raises MediaDecodeError(UNDECODABLE) saying after how many good frames of how many
    stated (used when writing shards: a file whose first frames decode may still break later)."""
    count, total, previous = 0, 0.0, None
    with _open(source) as container:
        if not container.streams.video:
            raise MediaDecodeError(NO_STREAM, "no video stream")
        stream = container.streams.video[0]
        stated = int(stream.frames) if stream.frames else None
        try:
            for frame in container.decode(stream):
                small = rgb_frame(frame, thumbnail, thumbnail).astype(np.int16)
                if previous is not None:
                    total += float(np.abs(small - previous).mean()) / 255.0
                previous, count = small, count + 1
        except av.FFmpegError as exc:
            of = f" of {stated}" if stated else ""
            raise MediaDecodeError(UNDECODABLE, f"frame {count + 1}{of} cannot be decoded (frames 1-{count} can): "
                                                f"{exc}") from exc
    if count == 0:
        raise MediaDecodeError(ZERO_LENGTH, "no frames decoded")
    return count, total / max(1, count - 1)


def probe_audio(source: Source) -> AudioInfo:
    """Read the first audio stream's sample rate, channel count and duration (seconds)."""
    with _open(source) as container:
        if not container.streams.audio:
            raise MediaDecodeError(NO_STREAM, "no audio stream")
        stream = container.streams.audio[0]
        info = AudioInfo(int(stream.rate or 0), int(stream.channels or 0), _stream_duration(stream, container))
    if info.sample_rate <= 0 or info.channels <= 0:
        raise MediaDecodeError(UNDECODABLE, f"rate={info.sample_rate} channels={info.channels}")
    if info.duration <= 0:
        raise MediaDecodeError(ZERO_LENGTH, "duration 0")
    return info


def probe_image(source: Source) -> tuple[int, int]:
    """Return (width, height) of an image (png, jpg, ...) from its header."""
    from PIL import Image, UnidentifiedImageError

    data = _as_file(source)
    try:
        with Image.open(data) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MediaDecodeError(UNDECODABLE, f"image header: {exc}") from exc
    if width <= 0 or height <= 0:
        raise MediaDecodeError(ZERO_LENGTH, f"size {width}x{height}")
    return width, height


def _as_file(source: Source) -> BinaryIO | str:
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise MediaDecodeError(ZERO_LENGTH, "empty payload")
        return io.BytesIO(source)
    return str(source) if isinstance(source, Path) else source


# ----------------------------------------------------------------------------------------------------------------
# decoding


@dataclass
class DecodedVideo:
    """A decoded clip: uint8 frames [T, H, W, 3], the source frame index of each, and the clip's fps/start."""

    frames: np.ndarray
    indices: np.ndarray
    fps: float
    start: float


def clip_times(num_frames: int, fps: float, start: float = 0.0) -> np.ndarray:
    """Sample times t_k = start + k / fps, k = 0..num_frames-1 (seconds)."""
    return start + np.arange(num_frames, dtype=np.float64) / fps


def decode_video(
    source: Source,
    num_frames: int | None = None,
    fps: float | None = None,
    start: float = 0.0,
    threads: int = 1,
) -> DecodedVideo:
    """Decode `num_frames` frames sampled at `fps` from `start` seconds (all frames at native fps if None).

    Frame k is the source frame nearest to t_k = start + k / fps, i.e. the last one whose presentation time
    is < t_k + 1 / (2 native fps) (ties go to the earlier frame); times past the end repeat the last frame.
    Decoding stops after the last needed frame, and seeks to the keyframe before `start` when start > 0.
    `threads` FFmpeg decoding threads: 1 (default) suits data loading, which runs a decoder per worker
    process; 0 lets FFmpeg choose (frame threads), for decoding one large video in one process.
    """
    with _open(source) as container:
        if not container.streams.video:
            raise MediaDecodeError(NO_STREAM, "no video stream")
        stream = container.streams.video[0]
        if threads == 1:
            stream.thread_type = "NONE"
        else:
            stream.thread_type, stream.codec_context.thread_count = "AUTO", threads
        rate = stream.average_rate or stream.base_rate or stream.guessed_rate
        native = float(rate) if rate else 0.0
        fps = fps or native or 1.0
        tb = float(stream.time_base) if stream.time_base else 1.0 / av.time_base
        t0 = float(stream.start_time * tb) if stream.start_time is not None else 0.0
        half = 0.5 / native - 1e-6 if native else 0.0
        targets = clip_times(num_frames, fps, start) if num_frames else None
        if start > 0 and stream.time_base is not None:
            try:
                container.seek(int((start + t0) / tb), stream=stream, backward=True, any_frame=False)
            except av.FFmpegError:
                container.seek(0)
        chosen: list[np.ndarray] = []
        indices: list[int] = []
        previous = None  # (frame, index, array or None)
        try:
            for frame in container.decode(stream):
                time = (frame.time if frame.time is not None else 0.0) - t0
                index = int(round(time * native)) if native else len(indices)
                if targets is None:
                    chosen.append(rgb_frame(frame))
                    indices.append(index)
                    continue
                current = [frame, index, None]
                while len(chosen) < num_frames and time > targets[len(chosen)] + half:
                    pick = previous or current
                    if pick[2] is None:
                        pick[2] = rgb_frame(pick[0])
                    chosen.append(pick[2])
                    indices.append(pick[1])
                if len(chosen) >= num_frames:
                    break
                previous = current
        except av.FFmpegError as exc:
            raise MediaDecodeError(UNDECODABLE, f"decode: {exc}") from exc
        if targets is not None and previous is not None:
            if previous[2] is None:
                previous[2] = rgb_frame(previous[0])
            while len(chosen) < num_frames:
                chosen.append(previous[2])
                indices.append(previous[1])
    if not chosen:
        raise MediaDecodeError(ZERO_LENGTH, "no frames decoded")
    return DecodedVideo(np.stack(chosen), np.asarray(indices, dtype=np.int64), fps, start)


def decode_image(source: Source) -> np.ndarray:
    """Decode an image to uint8 RGB [H, W, 3] (greyscale/alpha converted to RGB)."""
    from PIL import Image, UnidentifiedImageError

    data = _as_file(source)
    try:
        with Image.open(data) as image:
            array = np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise MediaDecodeError(UNDECODABLE, f"image: {exc}") from exc
    if array.size == 0:
        raise MediaDecodeError(ZERO_LENGTH, "empty image")
    return array


def decode_audio(
    source: Source,
    sample_rate: int | None = None,
    channels: int | None = None,
    start: float = 0.0,
    duration: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Decode the first audio stream to float32 [C, S] in [-1, 1] at `sample_rate` (native if None).

    The segment [start, start + duration) is returned, zero-padded at the end to exactly
    round(duration * sample_rate) samples. Channels: `channels=1` averages, `channels=2` duplicates mono.
    """
    with _open(source) as container:
        if not container.streams.audio:
            raise MediaDecodeError(NO_STREAM, "no audio stream")
        stream = container.streams.audio[0]
        rate = int(sample_rate or stream.rate or 0)
        if rate <= 0:
            raise MediaDecodeError(UNDECODABLE, "unknown sample rate")
        resampler = av.AudioResampler(format="fltp", rate=rate)
        origin = 0.0  # time of the first decoded sample (after a seek, the frame the seek landed on)
        seeked = False
        if start > 0.5 and stream.time_base is not None:
            try:
                container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
                seeked = True
            except av.FFmpegError:
                container.seek(0)
        first = last = None
        chunks: list[np.ndarray] = []
        total = 0
        try:
            for frame in container.decode(stream):
                if first is None:
                    t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
                    origin = max(0.0, (frame.time or 0.0) - t0) if seeked else 0.0
                    first = max(0, int(round((start - origin) * rate)))
                    last = first + int(round(duration * rate)) if duration is not None else None
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray()
                    chunks.append(chunk)
                    total += chunk.shape[1]
                if last is not None and total >= last:
                    break
            else:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray())
        except av.FFmpegError as exc:
            raise MediaDecodeError(UNDECODABLE, f"audio decode: {exc}") from exc
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise MediaDecodeError(ZERO_LENGTH, "no audio samples decoded")
    audio = np.concatenate(chunks, axis=1).astype(np.float32)
    if not np.isfinite(audio).all():
        raise MediaDecodeError(UNDECODABLE, "non-finite audio samples")
    audio = audio[:, first:last]
    if last is not None and first is not None and audio.shape[1] < last - first:
        audio = np.pad(audio, ((0, 0), (0, last - first - audio.shape[1])))
    if channels is not None and channels != audio.shape[0]:
        audio = audio.mean(axis=0, keepdims=True) if channels == 1 else np.repeat(audio[:1], channels, axis=0)
    return torch.from_numpy(np.ascontiguousarray(np.clip(audio, -1.0, 1.0))), rate


# ----------------------------------------------------------------------------------------------------------------
# resize and crop


def crop_box(
    height: int, width: int, size: tuple[int, int], offset: tuple[float, float] = (0.5, 0.5)
) -> tuple[int, int, int, int]:
    """The largest (top, left, h, w) window of aspect size[1]/size[0] inside a height x width frame.

    `offset` in [0, 1]^2 places it: (0.5, 0.5) is the centre crop, (0, 0) the top-left one.
    """
    target_h, target_w = size
    scale = min(height / target_h, width / target_w)
    crop_h = min(height, max(1, int(round(target_h * scale))))
    crop_w = min(width, max(1, int(round(target_w * scale))))
    top = int(round((height - crop_h) * offset[0]))
    left = int(round((width - crop_w) * offset[1]))
    return top, left, crop_h, crop_w


def crop_resize_frames(
    frames: np.ndarray | torch.Tensor, size: tuple[int, int], offset: tuple[float, float] = (0.5, 0.5)
) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, h, w, 3]: aspect crop (see `crop_box`), then resize if needed.

    The resize is `F.interpolate(mode="bilinear", antialias=True)` in float, rounded back to uint8. Without
    a resize (the crop already has the target size) the result is a view of `frames`, no copy.
    """
    frames = torch.as_tensor(frames)
    top, left, crop_h, crop_w = crop_box(frames.shape[1], frames.shape[2], size, offset)
    window = frames[:, top : top + crop_h, left : left + crop_w]
    if (crop_h, crop_w) == tuple(size):
        return window
    video = rearrange(window, "t h w c -> t c h w").float()
    video = F.interpolate(video, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return rearrange(video.round_().clamp_(0, 255).to(torch.uint8), "t c h w -> t h w c")


def frames_to_video(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [..., T, H, W, 3] -> float32 [..., 3, T, H, W] in [-1, 1]: x / 127.5 - 1, one strided copy."""
    video = torch.empty((*frames.shape[:-4], 3, *frames.shape[-4:-1]), dtype=torch.float32)
    video.copy_(rearrange(frames, "... t h w c -> ... c t h w"))
    return video.div_(127.5).sub_(1.0)


def resize_crop(
    frames: np.ndarray | torch.Tensor, size: tuple[int, int], offset: tuple[float, float] = (0.5, 0.5)
) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [3, T, h, w] in [-1, 1]: `crop_resize_frames`, then `frames_to_video`."""
    return frames_to_video(crop_resize_frames(frames, size, offset))


def resize_crop_labels(
    labels: np.ndarray | torch.Tensor, size: tuple[int, int], offset: tuple[float, float] = (0.5, 0.5)
) -> torch.Tensor:
    """Integer label maps [T, H, W] through the same crop as `resize_crop`, resized by nearest neighbour."""
    labels = torch.as_tensor(labels)
    top, left, crop_h, crop_w = crop_box(labels.shape[1], labels.shape[2], size, offset)
    window = labels[:, top : top + crop_h, left : left + crop_w]
    if (crop_h, crop_w) != tuple(size):
        window = F.interpolate(window[:, None].float(), size=tuple(size), mode="nearest-exact")[:, 0]
    return window.long().contiguous()


# ----------------------------------------------------------------------------------------------------------------
# encoding


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] (or [3, H, W]) float in [-1, 1] -> uint8 numpy [T, H, W, 3]; x -> round((x + 1) * 127.5)."""
    video = video.detach().float().cpu()
    if video.ndim == 3:
        video = video[:, None]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, T, H, W] or image [3, H, W], got {tuple(video.shape)}")
    pixels = ((video.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return np.ascontiguousarray(rearrange(pixels, "c t h w -> t h w c").numpy())


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad odd heights/widths by replicating the last row/column (yuv420p needs even sides)."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


_VIDEO_CODECS = {"mp4": ("libx264", "aac"), "mov": ("libx264", "aac"), "webm": ("libvpx-vp9", "libopus")}


def encode_frames(
    frames: np.ndarray,
    fps: float,
    format: str = "mp4",
    crf: int = 18,
    audio: np.ndarray | None = None,
    sample_rate: int | None = None,
    threads: int = 0,
) -> bytes:
    """uint8 [T, H, W, 3] frames -> mp4 (H.264 yuv420p), mov or webm (VP9) bytes, with optional audio [C, S]."""
    if format not in _VIDEO_CODECS:
        raise ValueError(f"video format must be one of {sorted(_VIDEO_CODECS)}, got {format!r}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"expected non-empty uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    frames = _even(frames)
    video_codec, audio_codec = _VIDEO_CODECS[format]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=format) as container:
        rate = Fraction(fps).limit_denominator(1001)
        time_base = 1 / rate
        stream = container.add_stream(video_codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        options = {"crf": str(crf)}
        if video_codec == "libvpx-vp9":
            options.update({"b": "0", "deadline": "realtime", "cpu-used": "8"})
        if threads:
            options["threads"] = str(threads)
        stream.options = options
        audio_stream = None
        if audio is not None:
            if not sample_rate:
                raise ValueError("sample_rate is required with audio")
            layout = "mono" if audio.shape[0] == 1 else "stereo"
            audio_stream = container.add_stream(audio_codec, rate=48000 if format == "webm" else sample_rate)
            audio_stream.layout = layout
        for index, pixels in enumerate(frames):
            # converting to yuv420p here (not inside encode) and explicit timestamps make the output deterministic;
            # on this thread (threads=1): a scaler's own threads cost more than the conversion of a small frame
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format="yuv420p", threads=1)
            frame.pts = index
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio_stream is not None:
            _encode_audio_stream(container, audio_stream, np.asarray(audio, dtype=np.float32), sample_rate)
    return buffer.getvalue()


def _encode_audio_stream(container, stream, audio: np.ndarray, sample_rate: int) -> None:
    """Encode float [C, S] audio into an open output stream, resampling to the stream's rate/format."""
    layout = "mono" if audio.shape[0] == 1 else "stereo"
    audio = np.ascontiguousarray(np.clip(audio[:2], -1.0, 1.0), dtype=np.float32)
    frame = av.AudioFrame.from_ndarray(audio, format="fltp", layout=layout)
    frame.sample_rate = sample_rate
    frame.pts = 0
    codec = stream.codec_context
    resampler = av.AudioResampler(format=codec.format, layout=layout, rate=codec.sample_rate,
                                  frame_size=codec.frame_size or None)
    position = 0
    for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
        chunk.pts, chunk.time_base = position, Fraction(1, codec.sample_rate)
        position += chunk.samples
        for packet in stream.encode(chunk):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def encode_video(
    video: torch.Tensor,
    fps: float,
    format: str = "mp4",
    crf: int = 18,
    audio: torch.Tensor | None = None,
    sample_rate: int | None = None,
) -> bytes:
    """[3, T, H, W] in [-1, 1] -> mp4 (H.264 yuv420p) or webm (VP9) bytes; `audio` [C, S] in [-1, 1] is muxed in."""
    audio_np = audio.detach().float().cpu().numpy() if audio is not None else None
    return encode_frames(to_uint8_frames(video), fps, format, crf, audio_np, sample_rate)


def encode_audio(audio: torch.Tensor | np.ndarray, sample_rate: int, format: str = "wav") -> bytes:
    """[C, S] (or [S]) float in [-1, 1] -> wav (PCM s16) or flac bytes."""
    audio = torch.as_tensor(audio).detach().float().cpu()
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2 or audio.shape[0] not in (1, 2) or audio.shape[1] == 0:
        raise ValueError(f"expected audio [C, S] with C in (1, 2) and S > 0, got {tuple(audio.shape)}")
    codec = {"wav": "pcm_s16le", "flac": "flac"}.get(format)
    if codec is None:
        raise ValueError(f"audio format must be wav or flac, got {format!r}")
    layout = "mono" if audio.shape[0] == 1 else "stereo"
    pcm = np.round(np.clip(audio.numpy(), -1.0, 1.0) * 32767.0).astype(np.int16)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=format) as container:
        stream = container.add_stream(codec, rate=sample_rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(rearrange(pcm, "c s -> 1 (s c)")), format="s16",
                                           layout=layout)
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def encode_image(image: torch.Tensor | np.ndarray, format: str = "png", quality: int = 95) -> bytes:
    """[3, H, W] / [3, 1, H, W] float in [-1, 1] (or uint8 [H, W, 3] numpy) -> png or jpg bytes."""
    from PIL import Image

    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        pixels = image
    else:
        pixels = to_uint8_frames(torch.as_tensor(image))[0]
    kind = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}.get(format)
    if kind is None:
        raise ValueError(f"image format must be png or jpg, got {format!r}")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind, **({"quality": quality} if kind == "JPEG" else {}))
    return buffer.getvalue()


def _write(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def encode_gif(video: torch.Tensor | np.ndarray, fps: float) -> bytes:
    """[3, T, H, W] float in [-1, 1] (or uint8 [T, H, W, 3] numpy) -> an animated GIF that loops forever (frame
    delays are whole hundredths of a second in GIF: 8 fps plays at 120 ms a frame)."""
    from PIL import Image

    frames = video if isinstance(video, np.ndarray) else to_uint8_frames(video)
    images = [Image.fromarray(f) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=round(1000 / (fps if fps > 0 else 8.0)))
    return buffer.getvalue()


def write_gif(path: str | Path, video: torch.Tensor, fps: float) -> Path:
    """Write [3, T, H, W] in [-1, 1] to `path` as a looping GIF (a sticker's animation)."""
    return _write(path, encode_gif(video, fps))


def write_video(path: str | Path, video: torch.Tensor, fps: float, **kwargs) -> Path:
    """Write [3, T, H, W] in [-1, 1] to `path`; the suffix (.mp4, .webm, .mov) picks the format."""
    return _write(path, encode_video(video, fps, format=Path(path).suffix.lstrip(".").lower(), **kwargs))


def write_audio(path: str | Path, audio: torch.Tensor, sample_rate: int) -> Path:
    """Write [C, S] in [-1, 1] to `path` (.wav or .flac)."""
    return _write(path, encode_audio(audio, sample_rate, format=Path(path).suffix.lstrip(".").lower()))


def write_image(path: str | Path, image: torch.Tensor) -> Path:
    """Write [3, H, W] in [-1, 1] to `path` (.png or .jpg)."""
    return _write(path, encode_image(image, format=Path(path).suffix.lstrip(".").lower()))


def duration_frames(duration: float, fps: float) -> int:
    """How many frames at `fps` fit in `duration` seconds: floor(duration * fps + 1e-6)."""
    return int(math.floor(duration * fps + 1e-6))
