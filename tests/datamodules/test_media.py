"""PyAV decode/encode: real h264 mp4, webm, wav and flac round trips, frame sampling, crops, error reasons."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch

from datamodules.media import (
    UNDECODABLE,
    ZERO_LENGTH,
    MediaDecodeError,
    crop_box,
    decode_audio,
    decode_image,
    decode_video,
    encode_audio,
    encode_frames,
    encode_image,
    encode_video,
    probe_audio,
    probe_video,
    resize_crop,
    resize_crop_labels,
    write_audio,
    write_video,
)
from tests.datamodules.helpers import clip, wav


def test_mp4_is_browser_playable_h264_and_round_trips(tmp_path):
    video = torch.linspace(-1, 1, 8)[None, :, None, None].expand(3, 8, 16, 24).contiguous()
    path = write_video(tmp_path / "a.mp4", video, fps=8)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
    decoded = decode_video(path)
    assert decoded.frames.shape == (8, 16, 24, 3)
    back = resize_crop(decoded.frames, (16, 24))
    assert back.shape == (3, 8, 16, 24)
    assert (back - video).abs().mean() < 0.03


def test_frame_sampling_at_target_fps_and_start():
    data = clip(0, frames=24, fps=12)  # frame k has red = 20 k
    info = probe_video(data)
    assert (info.num_frames, info.fps, info.duration) == (24, 12.0, 2.0)
    clip6 = decode_video(data, num_frames=6, fps=6, start=0.5)  # t = 0.5, 0.667, ... -> frames 6, 8, ...
    assert clip6.indices.tolist() == [6, 8, 10, 12, 14, 16]
    red = clip6.frames[:, 0, 0, 0].astype(int)
    assert np.abs(red - np.array([120, 160, 200, 240, 24, 64])).max() <= 6  # 20 k mod 256, h264 error
    assert decode_video(data, num_frames=4, fps=5).indices.tolist() == [0, 2, 5, 7]  # nearest: 0, 2.4, 4.8, 7.2
    repeated = decode_video(data, num_frames=4, fps=24)  # above native fps: frames repeat
    assert repeated.indices.tolist() == [0, 0, 1, 1]


def test_webm_and_muxed_audio():
    video = torch.rand(3, 5, 17, 15) * 2 - 1  # odd sides are padded to even for yuv420p
    audio = torch.sin(torch.linspace(0, 150, 4000))[None] * 0.5  # as long as the video, 0.5 s
    for fmt in ("mp4", "webm"):
        data = encode_video(video, fps=10, format=fmt, audio=audio, sample_rate=8000)
        info = probe_video(data)
        assert (info.height, info.width, info.num_frames) == (18, 16, 5) and info.has_audio
        decoded, rate = decode_audio(data, sample_rate=8000, duration=0.4)
        assert decoded.shape == (1, 3200) and rate == 8000 and decoded.abs().max() > 0.2


def test_wav_flac_round_trip_and_resampling(tmp_path):
    tone = (0.5 * torch.sin(2 * torch.pi * 440 * torch.arange(16000) / 16000))[None].repeat(2, 1)
    path = write_audio(tmp_path / "a.wav", tone, 16000)
    back, rate = decode_audio(path)
    assert rate == 16000 and back.shape == (2, 16000) and (back - tone).abs().max() < 1e-3
    flac = encode_audio(tone, 16000, "flac")
    assert probe_audio(flac).channels == 2
    mono, rate = decode_audio(flac, sample_rate=8000, channels=1, start=0.25, duration=0.5)
    assert rate == 8000 and mono.shape == (1, 4000)
    spectrum = torch.fft.rfft(mono[0]).abs()
    assert abs(int(spectrum.argmax()) * 8000 / 4000 - 440) <= 4
    padded, _ = decode_audio(wav(0.5), duration=1.0)  # past the end: zero padding to the exact length
    assert padded.shape[1] == 8000 and padded[0, 4100:].abs().max() == 0


def test_image_round_trip_and_crops():
    image = torch.rand(3, 20, 30) * 2 - 1
    png = encode_image(image)
    decoded = decode_image(png)
    assert decoded.shape == (20, 30, 3)
    assert (resize_crop(decoded[None], (20, 30))[:, 0] - image).abs().max() <= 1 / 127.5 + 1e-6
    assert crop_box(20, 30, (10, 10)) == (0, 5, 20, 20)
    assert crop_box(20, 30, (10, 10), offset=(0, 0)) == (0, 0, 20, 20)
    assert resize_crop(decoded[None], (8, 8)).shape == (3, 1, 8, 8)
    labels = np.zeros((2, 20, 30), dtype=np.uint8)
    labels[:, :, 15:] = 3
    small = resize_crop_labels(labels, (10, 10))
    assert set(small.unique().tolist()) == {0, 3} and small.dtype == torch.int64



def test_frames_convert_on_the_calling_thread_to_the_same_pixels() -> None:
    """Decoding converts each frame to RGB on the calling thread (`rgb_frame`: no scaler threads, ~2x faster on
    small clips); the pixels are those of PyAV's own conversion."""
    rng = np.random.default_rng(0)
    data = encode_frames((rng.random((6, 24, 40, 3)) * 255).astype(np.uint8), fps=8.0)
    with av.open(io.BytesIO(data)) as container:
        expected = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert np.array_equal(decode_video(io.BytesIO(data)).frames, expected)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"", ZERO_LENGTH), (b"\x00garbage" * 50, UNDECODABLE), ("wav", "no_stream")],
)
def test_decode_errors_carry_a_reason(payload, reason):
    payload = wav() if payload == "wav" else payload
    with pytest.raises(MediaDecodeError) as error:
        decode_video(payload, num_frames=4)
    assert error.value.reason == reason
    with pytest.raises(MediaDecodeError):
        decode_audio(b"\x00garbage" * 50)


def test_truncated_mp4_is_undecodable():
    data = clip(1)
    with pytest.raises(MediaDecodeError):
        decode_video(io.BytesIO(data[: len(data) // 3]).getvalue(), num_frames=8)


def test_audio_segments_after_a_seek_and_muxed_audio_stay_in_sync():
    rate = 16000
    t = torch.arange(3 * rate) / rate
    chirp = (0.5 * torch.sin(2 * torch.pi * (200 + 100 * t) * t))[None]
    full, _ = decode_audio(encode_audio(chirp, rate))
    segment, _ = decode_audio(encode_audio(chirp, rate, "flac"), start=2.0, duration=0.5)  # seeks
    assert torch.equal(segment, full[:, 2 * rate : 2 * rate + rate // 2])
    muxed = encode_video(torch.zeros(3, 48, 16, 16), fps=16, audio=chirp, sample_rate=rate)  # AAC in mp4
    back, _ = decode_audio(muxed, sample_rate=rate, duration=3.0)
    lags = range(-200, 201)
    errors = [float((back[0, 8000 + lag : 40000 + lag] - chirp[0, 8000:40000]).abs().mean()) for lag in lags]
    assert lags[int(np.argmin(errors))] == 0 and min(errors) < 0.01  # no encoder-delay shift
