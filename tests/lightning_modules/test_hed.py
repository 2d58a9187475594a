"""The HED edge network (AVID's structure guidance): its architecture against a count by hand, a hand-set network
against the same pipeline computed in numpy (stage wiring, pooling, upsampling, fuse, input convention), loading
from a local folder (round trip, wrong and missing files), and `EdgeMap(method="hed")`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_modules.conditioning.structure import EdgeMap
from lightning_modules.nn.controlnet import LUMA, SOBEL_X, luminance, sobel_gradients
from lightning_modules.nn.hed import CAFFE_BGR_MEAN, HED, hed_edges, load_hed

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def hed_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A folder holding hed.pt, the state dict of a randomly initialised HED (seed 0), and that state dict."""
    torch.manual_seed(0)
    state = HED().state_dict()
    folder = tmp_path_factory.mktemp("hed")
    torch.save(state, folder / "hed.pt")
    return folder, state


def random_video(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- architecture ------------------------------------------------------------------------------------------------------
def test_parameter_count_matches_the_layer_list_by_hand() -> None:
    convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
             (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    vgg = sum(c_in * c_out * 3 * 3 + c_out for c_in, c_out in convs)
    assert vgg == 14_714_688  # VGG16's convolutional part
    sides = sum(c + 1 for c in (64, 128, 256, 512, 512))  # 1x1 conv to 1 channel, with bias
    fuse = 5 + 1
    net = HED()
    assert sum(p.numel() for p in net.parameters()) == vgg + sides + fuse == 14_716_171
    names = set(net.state_dict())
    assert {"stages.0.0.weight", "stages.4.2.bias", "sides.0.weight", "sides.4.bias", "fuse.weight"} <= names
    assert "mean" not in names  # a constant of the input convention, not a weight
    assert [len(stage) for stage in net.stages] == [2, 2, 3, 3, 3]


def test_edges_of_a_video_have_its_shape_and_lie_in_0_1(hed_folder: tuple[Path, dict]) -> None:
    net = HED()
    net.load_state_dict(hed_folder[1])
    video = random_video(2, 3, 4, 20, 28)
    edges = hed_edges(video, net, chunk=3)  # 8 frames in chunks of 3, 3, 2
    assert edges.shape == (2, 1, 4, 20, 28) and edges.dtype == video.dtype
    assert not edges.requires_grad
    assert 0 <= edges.min() and edges.max() <= 1
    # frame (b, t) of the output is the net on frame (b, t) of the input, whatever the chunking
    with torch.no_grad():
        frame = net(video[1, :, 2][None])[0]
    torch.testing.assert_close(edges[1, :, 2], frame)
    torch.testing.assert_close(hed_edges(video, net, chunk=100), edges)


# -- a hand-set network against numpy ---------------------------------------------------------------------------------
def block_max_pool(x: np.ndarray) -> np.ndarray:
    """2x2 max-pool, stride 2, odd sizes floored."""
    h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
    return x[:h, :w].reshape(h // 2, 2, w // 2, 2).max(axis=(1, 3))


def bilinear_1d(size_in: int, size_out: int) -> np.ndarray:
    """The [size_out, size_in] matrix of half-pixel-centred linear interpolation (borders clamped)."""
    m = np.zeros((size_out, size_in))
    for o in range(size_out):
        src = max((o + 0.5) * size_in / size_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), size_in - 1)
        i1 = min(i0 + 1, size_in - 1)
        m[o, i0] += 1 - (src - i0)
        m[o, i1] += src - i0
    return m


def bilinear(x: np.ndarray, h: int, w: int) -> np.ndarray:
    return bilinear_1d(x.shape[0], h) @ x @ bilinear_1d(x.shape[1], w).T


def luminance_carrier() -> tuple[HED, list[float], list[float], list[float]]:
    """An HED whose channel 0 carries 255 · luminance through every stage (all other weights zero): conv1_1's
    channel 0 is the luminance of the BGR input plus the means back, every later conv's channel 0 copies channel 0
    (centre tap 1). Side k = s_k · (its stage's channel 0) + b_k; fuse = Σ f_k side_k + f_b. All distinct."""
    net = HED().double()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        bgr = (LUMA[2], LUMA[1], LUMA[0])
        net.stages[0][0].weight[0, :, 1, 1] = torch.tensor(bgr, dtype=torch.float64)
        net.stages[0][0].bias[0] = sum(c * m for c, m in zip(bgr, CAFFE_BGR_MEAN))
        for stage in net.stages:
            for conv in stage[1:] if stage is net.stages[0] else stage:
                conv.weight[0, 0, 1, 1] = 1.0
        scales, biases, fuse = [1.0, -2.0, 3.0, -4.0, 5.0], [0.1, -0.2, 0.3, 0.4, -0.5], [0.5, 0.4, -0.3, 0.2, 0.1]
        for side, s, b in zip(net.sides, scales, biases):
            side.weight[0, 0] = s / 255
            side.bias[0] = b
        net.fuse.weight[0, :, 0, 0] = torch.tensor(fuse, dtype=torch.float64)
        net.fuse.bias[0] = -0.7
    return net, scales, biases, fuse


def test_hand_set_network_matches_numpy_stage_by_stage() -> None:
    """Fails on a side output fed by the wrong stage, a missing or misplaced pool, upsampling to the wrong size or
    with other corners, a permuted or unweighted fuse, or RGB/BGR or scale mix-ups in the input convention."""
    net, scales, biases, fuse = luminance_carrier()
    h, w = 26, 30  # pooled to 13x15, 6x7, 3x3, 1x1: odd sizes floored
    image = random_video(1, 3, h, w, seed=1).double()

    rgb = (image[0].numpy() + 1) / 2
    y = 255 * np.einsum("chw,c->hw", rgb, LUMA)
    expected_sides, stage = [], y
    for k in range(5):
        if k > 0:
            stage = block_max_pool(stage)
        expected_sides.append(bilinear(scales[k] / 255 * stage + biases[k], h, w))
    logits = sum(f * s for f, s in zip(fuse, expected_sides)) - 0.7
    expected = 1 / (1 + np.exp(-logits))

    with torch.no_grad():
        sides = net.side_outputs(image)
        out = net(image)
    assert [tuple(s.shape) for s in sides] == [(1, 1, h, w)] * 5
    for k in range(5):
        np.testing.assert_allclose(sides[k][0, 0].numpy(), expected_sides[k], atol=1e-9, err_msg=f"side {k + 1}")
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-9)


def test_hand_set_sobel_network_finds_the_edges_sobel_finds() -> None:
    """conv1_1 = ±Sobel-x of the luminance, conv1_2 sums them to |G_x|, side 1 reads it, the fuse thresholds it:
    inside the frame (conv zero padding differs from Sobel's replicated border) side 1 equals |G_x| / 4 of
    `nn.controlnet`'s Sobel, and a vertical step's edge lies on the two columns around it."""
    net = HED().double()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        sobel = torch.tensor(SOBEL_X, dtype=torch.float64)
        for c, coefficient in enumerate((LUMA[2], LUMA[1], LUMA[0])):  # the net's input is BGR
            net.stages[0][0].weight[0, c] = coefficient * sobel
            net.stages[0][0].weight[1, c] = -coefficient * sobel
        net.stages[0][1].weight[0, :2, 1, 1] = 1.0
        net.sides[0].weight[0, 0] = 1 / (4 * 255)
        net.fuse.weight[0, 0] = 20.0
        net.fuse.bias[0] = -10.0  # sigmoid(20 · (|G_x| / 4 − 1/2))

    video = random_video(1, 3, 2, 16, 16, seed=2).double()
    gx, _ = sobel_gradients(luminance(video))  # in float32
    with torch.no_grad():
        side = net.side_outputs(video[:, :, 0])[0]
    torch.testing.assert_close(side[0, 0, 1:-1, 1:-1], gx[0, 0, 1:-1, 1:-1].double().abs() / 4, atol=1e-5, rtol=0)

    step = torch.full((1, 3, 2, 16, 16), -1.0, dtype=torch.float64)
    step[..., 7:] = 1.0  # a full-range vertical step before column 7
    edges = hed_edges(step, net)[0, 0, :, 1:-1, 1:-1] > 0.5
    expected = torch.zeros(2, 14, 14, dtype=torch.bool)
    expected[..., 5:7] = True  # columns 6 and 7 of the frame
    torch.testing.assert_close(edges, expected)


# -- loading --------------------------------------------------------------------------------------------------------
def test_load_hed_round_trip(hed_folder: tuple[Path, dict]) -> None:
    folder, state = hed_folder
    net = HED()
    net.load_state_dict(state)
    loaded = load_hed(str(folder))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    frames = random_video(2, 3, 32, 32, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(frames), net(frames), rtol=0, atol=0)


def test_load_hed_names_a_wrong_key(hed_folder: tuple[Path, dict], tmp_path: Path) -> None:
    state = dict(hed_folder[1])
    state["sides.2.w"] = state.pop("sides.2.weight")
    torch.save(state, tmp_path / "hed.pt")
    with pytest.raises(ValueError, match=r"sides\.2\.weight") as error:
        load_hed(tmp_path)
    assert "sides.2.w'" in str(error.value) and "\n" not in str(error.value)

    state["sides.2.weight"] = torch.zeros(1, 128, 1, 1)  # right name, wrong shape (stage 2's width)
    del state["sides.2.w"]
    torch.save(state, tmp_path / "hed.pt")
    with pytest.raises(ValueError, match=r"sides\.2\.weight \(1, 128, 1, 1\) \(expected \(1, 256, 1, 1\)\)"):
        load_hed(tmp_path)


def test_load_hed_names_a_missing_folder_or_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="no folder") as error:
        load_hed(missing)
    assert str(missing) in str(error.value) and "hed.pt" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="no file") as error:
        load_hed(tmp_path)
    assert str(tmp_path / "hed.pt") in str(error.value)


# -- EdgeMap --------------------------------------------------------------------------------------------------------
def test_edge_map_with_hed_on_the_latent_grid(hed_folder: tuple[Path, dict]) -> None:
    folder, state = hed_folder
    edge_map = EdgeMap(method="hed", hed_dir=str(folder))
    assert not edge_map._hed  # loaded lazily
    video = random_video(2, 3, 4, 16, 24, seed=4)
    raw = edge_map.inputs({"video": video}, encode=None, latent_shape=(4, 2, 4, 6), train=True)
    assert raw.shape == (2, 1, 2, 4, 6) and 0 <= raw.min() and raw.max() <= 1

    net = HED()
    net.load_state_dict(state)
    expected = torch.nn.functional.adaptive_max_pool3d(hed_edges(video, net), (2, 4, 6))
    torch.testing.assert_close(raw, expected)
    loaded = edge_map._hed[0]
    edge_map.inputs({"video": video}, encode=None, latent_shape=(4, 2, 4, 6), train=True)
    assert edge_map._hed == [loaded]  # loaded once
    # the frozen net is no part of the module: not in its state dict, parameters or children
    assert not edge_map.state_dict() and not list(edge_map.parameters()) and not list(edge_map.children())


def test_edge_map_hed_needs_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hed_dir"):
        EdgeMap(method="hed")
    edge_map = EdgeMap(method="hed", hed_dir=str(tmp_path))  # no hed.pt: found at the first batch
    with pytest.raises(FileNotFoundError, match="hed.pt"):
        edge_map.edges({"video": torch.zeros(1, 3, 1, 8, 8)})
