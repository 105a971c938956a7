"""The Inspector API: the inputs vision stacks hold, geometry, and clear errors."""

from __future__ import annotations

import json
import threading
import warnings

import numpy as np
import pytest

from conftest import texture
from eproj.bundle import BundleError
from eproj.errors import ConfigError, DataError
from eproj.runtime import Inspector


@pytest.fixture(scope="module")
def inspector(bundles):
    return Inspector.from_bundle(bundles["l2ae"][1], backend="onnxruntime", max_iters=5, fit="none")


def _frame(seed=0, size=32):
    return (texture(np.random.default_rng(seed), size) * 255).astype(np.uint8)


def test_every_accepted_form_gives_the_same_answer(inspector):
    f = _frame()
    base = inspector(f)[0]
    assert base.anomaly_map.shape == (32, 32) and base.mask.shape == (32, 32) and base.mask.dtype == bool
    assert base.projection.shape == (32, 32, 1) and 0 <= base.iterations <= 5
    assert set(base.timings) == {"preprocess", "iterations", "dssim", "postprocess", "total"}
    for form in (f[:, :, None], [f], np.stack([f, f])[:, :, :, None], f.astype(np.float32) / 255,
                 f.astype(np.uint16) * 257):
        got = inspector(form)[0]
        np.testing.assert_allclose(got.anomaly_map, base.anomaly_map, atol=1e-5)
        assert got.score == pytest.approx(base.score, abs=1e-5)


def test_batches_larger_than_the_batch_size_are_split(bundles):
    small = Inspector.from_bundle(bundles["l2ae"][1], backend="onnxruntime", max_iters=3, fit="none", batch_size=2)
    frames = [_frame(i) for i in range(5)]
    whole = Inspector.from_bundle(bundles["l2ae"][1], backend="onnxruntime", max_iters=3, fit="none")(frames)
    for a, b in zip(small(frames), whole):
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)
    # 5 tiles at batch size 2: three batches of 2, 2 and 1 (no fewer batches can hold them)
    assert sorted(small._projectors) == [1, 2]


@pytest.mark.parametrize("total, batch_size, sizes", [
    (49, 16, [12, 12, 12, 13]), (48, 16, [16, 16, 16]), (17, 16, [8, 9]), (5, 2, [1, 2, 2]),
    (1, 16, [1]), (16, 16, [16]), (3, 1, [1, 1, 1])])
def test_batch_spans_are_the_fewest_and_even(total, batch_size, sizes):
    from eproj.runtime.inspector import batch_spans

    spans = batch_spans(total, batch_size)
    assert [b - a for a, b in spans] == sizes
    assert spans[0][0] == 0 and spans[-1][1] == total and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    with pytest.raises(ValueError, match="batch_size >= 1"):
        batch_spans(total, 0)


def test_cpu_batches_split_across_loops_side_by_side(bundles):
    """threads=3 on 7 tiles: loops of 3, 2 and 2 tiles at once, the same answers as one
    loop (ONNX Runtime's one- and three-thread sessions round alike to 1e-5); a
    single tile runs one loop on the three-thread session."""
    from eproj.runtime.projector import ParallelProjector, Projector

    frames = [_frame(seed) for seed in range(7)]
    one = Inspector.from_bundle(bundles["l2ae"][1], backend="onnxruntime", threads=1, max_iters=4, fit="none")
    three = Inspector.from_bundle(bundles["l2ae"][1], backend="onnxruntime", threads=3, max_iters=4, fit="none")
    assert "3 loops side by side" in three.backend_note
    for a, b in zip(one(frames), three(frames)):
        np.testing.assert_allclose(b.projection, a.projection, atol=1e-5)
        np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, atol=1e-5)
        assert (b.iterations, b.stop_reasons) == (a.iterations, a.stop_reasons)
    split = three._projectors[7]
    assert isinstance(split, ParallelProjector) and [p.n for p in split.parts] == [3, 2, 2]
    assert isinstance(one._projectors[7], Projector)
    three(frames[0])
    assert isinstance(three._projectors[1], Projector) and three._projectors[1].backend is three.backend
    with pytest.raises(ConfigError, match="workers"):
        ParallelProjector(three.backend.serial(), 2, 1, 32, three.config, 0.5, workers=3)
    single = Inspector.from_bundle(bundles["l2ae"][1], backend="onnxruntime", threads=3, loops=1, max_iters=4,
                                   fit="none")
    for a, b in zip(one(frames), single(frames)):
        np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, atol=1e-5)
    assert isinstance(single._projectors[7], Projector) and "side by side" not in single.backend_note
    with pytest.raises(ConfigError, match="loops must be >= 1, got 0"):
        Inspector.from_bundle(bundles["l2ae"][1], backend="onnxruntime", loops=0)


def test_resize_and_tile_return_maps_at_the_frame_size(bundles):
    folder = bundles["l2ae"][1]
    tiled = Inspector.from_bundle(folder, backend="onnxruntime", max_iters=2, fit="tile")
    frame = (texture(np.random.default_rng(1), 64) * 255).astype(np.uint8)[:, :48]
    with pytest.raises(DataError, match="64 x 24 is 64 x 24 at the working scale 1, smaller than the model's 32"):
        tiled(frame[:, :24].copy())
    r = tiled(frame[:, :32].copy())[0]  # tiles at rows 0, 16, 32: half a tile apart
    assert r.anomaly_map.shape == (64, 32) and r.projection.shape == (64, 32, 1) and len(r.stop_reasons) == 3
    r = tiled(frame[:, :40].copy())[0]  # columns of tiles at 0 and 8: the last one ends at the border
    assert r.anomaly_map.shape == (64, 40) and len(r.stop_reasons) == 3 * 2
    resized = Inspector.from_bundle(folder, backend="onnxruntime", max_iters=2, fit="resize")(frame)[0]
    assert resized.anomaly_map.shape == (64, 48) and resized.mask.shape == (64, 48)


def test_reconstruction_baseline(bundles):
    r = Inspector.from_bundle(bundles["vae"][1], backend="onnxruntime", method="reconstruction", fit="none")(_frame())[0]
    assert r.iterations == 0 and r.stop_reasons == ["none"]


@pytest.mark.parametrize("frames,message", [
    (np.zeros((40, 32), np.uint8), "the model takes 32 x 32 frames, got 40 x 32"),
    (np.zeros((32, 32, 3), np.uint8), r"expects 1 channel \(gray\), got 3"),
    (np.zeros((32, 32, 5), np.uint8), "a 3-D array is one H x W x C frame"),
    (np.full((32, 32), 2.0, np.float32), r"float pixels must lie in \[0, 1\], got \[2, 2\]"),
    (np.full((32, 32), np.nan, np.float32), "NaN or Inf"),
    (np.zeros((32, 32), np.int64), "dtype must be uint8, uint16 or float, got int64"),
    ([], "no frames: the batch is empty"),
    ("frame.png", "frames must be a NumPy array or a list of them, got str"),
])
def test_bad_frames_get_clear_errors(inspector, frames, message):
    with pytest.raises(DataError, match=message):
        inspector(frames)


def test_bad_options_and_bundles(bundles, tmp_path):
    folder = bundles["l2ae"][1]
    with pytest.raises(ConfigError, match=r"unknown projection parameter\(s\) \['alpah'\]"):
        Inspector.from_bundle(folder, backend="onnxruntime", alpah=0.1)
    with pytest.raises(ConfigError, match="backend must be one of"):
        Inspector.from_bundle(folder, backend="openvno")
    with pytest.raises(BundleError, match="is not a bundle"):
        Inspector.from_bundle(tmp_path, backend="onnxruntime")
    old = tmp_path / "old"
    old.mkdir()
    for p in folder.iterdir():
        (old / p.name).write_bytes(p.read_bytes())
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema version 99; this eproj reads version 1"):
        Inspector.from_bundle(old, backend="onnxruntime")


def test_auto_picks_and_says_why(bundles):
    inspector = Inspector.from_bundle(bundles["l2ae"][1], fit="none")
    import torch

    if not torch.cuda.is_available():
        assert inspector.backend.name == "onnxruntime" and inspector.backend.device == "cpu"
        note = inspector.backend_note
        assert note.startswith("auto: picked onnxruntime on cpu; passed over tensorrt on cuda (")
        assert "torch on cuda (torch has no CUDA device)" in note


def test_auto_honours_the_device(bundles):
    """--device cpu never picks a GPU backend; --device cuda never falls back to the CPU."""
    import torch

    folder = bundles["l2ae"][1]
    on_cpu = Inspector.from_bundle(folder, device="cpu", fit="none")
    assert (on_cpu.backend.name, on_cpu.backend.device) == ("onnxruntime", "cpu")
    assert on_cpu.backend_note == "auto: picked onnxruntime on cpu"  # nothing on cuda was even tried
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"no backend can run this bundle on cuda here: tensorrt on cuda "
                                              r"\(.*\); torch on cuda \(torch has no CUDA device\); "
                                              r"onnxruntime on cuda \((.*CUDAExecutionProvider"
                                              r"|the fused CUDA kernels cannot run)"):
            Inspector.from_bundle(folder, device="cuda")
    with pytest.raises(ConfigError, match="device must be one of"):
        Inspector.from_bundle(folder, device="gpu")


@pytest.mark.parametrize("backend,options,message", [
    ("torch", dict(precision="fp16"), r"the torch backend does not take precision='fp16' \(it takes: cuda_graphs"),
    ("torch", dict(threads=2), r"the torch backend does not take threads=2"),
    ("torch", dict(loops=1), r"the torch backend does not take loops=1"),
    ("torch", dict(cuda_graphs=True), r"cuda_graphs=True applies to the torch backend on cuda, not on the cpu"),
    ("onnxruntime", dict(cuda_graphs=False), r"the onnxruntime backend does not take cuda_graphs=False"),
    ("tensorrt", dict(threads=4), r"the tensorrt backend does not take threads=4"),
    ("tensorrt", dict(loops=2, threads=1), r"does not take threads=1, loops=2"),
])
def test_an_option_the_backend_does_not_take_is_refused(bundles, backend, options, message):
    with pytest.raises(ConfigError, match=message):
        Inspector.from_bundle(bundles["l2ae"][1], backend=backend, fit="none", **options)


def test_auto_passes_over_backends_that_do_not_take_an_option(bundles):
    inspector = Inspector.from_bundle(bundles["l2ae"][1], fit="none", loops=1)
    assert inspector.backend.name == "onnxruntime"
    assert "tensorrt on cuda (does not take loops=1)" in inspector.backend_note
    assert "torch on cuda (does not take loops=1)" in inspector.backend_note
    with pytest.raises(ConfigError, match=r"no backend can run this bundle on cuda here: .*onnxruntime on cuda "
                                          r"\(does not take loops=1|onnxruntime on cuda .*loops=1"
                                          r"|onnxruntime on cuda \(the fused CUDA kernels cannot run"):
        Inspector.from_bundle(bundles["l2ae"][1], device="cuda", loops=1)


def test_close_releases_and_refuses_later_calls(bundles):
    frames = [_frame(i) for i in range(3)]
    with Inspector.from_bundle(bundles["l2ae"][1], backend="onnxruntime", threads=2, max_iters=2,
                               fit="none") as inspector:
        inspector(frames)
        pools = [p._pool for p in inspector._projectors.values() if hasattr(p, "_pool")]
        assert pools, "a batch of 3 tiles on 2 threads runs as loops side by side"
    assert all(pool._shutdown for pool in pools)
    assert inspector.backend.session is None
    with pytest.raises(ConfigError, match="this Inspector is closed"):
        inspector(frames)
    inspector.close()  # idempotent


def test_threads_share_an_inspector_in_turn(inspector):
    frames = [_frame(i) for i in range(4)]
    expected = [inspector(f)[0].score for f in frames]
    got = [None] * 4

    def work(i):
        got[i] = inspector(frames[i])[0].score

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == pytest.approx(expected, abs=1e-6)


def test_colour_frames_are_bgr_by_default(tmp_path):
    from conftest import make_mvtec
    from eproj.export.onnx_graphs import export_bundle
    from eproj.train.models import ModelConfig
    from eproj.train.trainer import TrainConfig, train

    data = make_mvtec(tmp_path / "mvtec" / "pill", size=32, channels=3)
    run = train(tmp_path / "run", ModelConfig(family="l2ae", size=32, latent=8, channels=3),
                TrainConfig(data=f"mvtec:{data}", steps=2, batch=4), progress=False)
    export_bundle(run, tmp_path / "bundle")
    rgb = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    as_bgr = Inspector.from_bundle(tmp_path / "bundle", backend="onnxruntime", max_iters=2, fit="none")
    as_rgb = Inspector.from_bundle(tmp_path / "bundle", backend="onnxruntime", max_iters=2, fit="none",
                                   channel_order="rgb")
    a, b = as_bgr(rgb[:, :, ::-1].copy())[0], as_rgb(rgb)[0]
    np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)
    np.testing.assert_allclose(a.projection[:, :, ::-1], b.projection, atol=1e-6)  # each in its caller's order


def _copy_bundle(source, target, **input_fields):
    """A copy of a bundle whose manifest's ``input`` has ``input_fields`` set (None: removed);
    the manifest itself is not hashed."""
    import shutil

    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    for key, value in input_fields.items():
        if value is None:
            manifest["input"].pop(key, None)
        else:
            manifest["input"][key] = value
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_tiled_frames_of_any_size_at_the_working_scale(bundles, tmp_path):
    """A bundle recording working scale 0.5 inspects a 96 x 80 frame as 48 x 40 (tiles at
    0, 16 and 0, 8); maps come back at 96 x 80 and match inspecting the resized frame
    and resizing its map; a bundle without the field tiles at scale 1.0."""
    import cv2

    half = _copy_bundle(bundles["l2ae"][1], tmp_path / "half", fit="tile", scale=0.5)
    old = _copy_bundle(bundles["l2ae"][1], tmp_path / "old", fit="tile", scale=None)
    frame = (texture(np.random.default_rng(2), 96)[:, :80] * 255).astype(np.uint8)
    inspector = Inspector.from_bundle(half, backend="onnxruntime", max_iters=2)
    assert inspector.scale == 0.5 and inspector.tile_stride == 16
    r = inspector(frame)[0]
    assert r.anomaly_map.shape == (96, 80) and r.mask.shape == (96, 80) and r.projection.shape == (96, 80, 1)
    assert len(r.stop_reasons) == 2 * 2
    small = cv2.resize(frame.astype(np.float32) / 255, (40, 48), interpolation=cv2.INTER_AREA)
    plain = Inspector.from_bundle(old, backend="onnxruntime", max_iters=2)
    assert plain.scale == 1.0
    s = plain(small)[0]
    assert s.score == pytest.approx(r.score, abs=1e-6)
    np.testing.assert_allclose(r.anomaly_map, cv2.resize(s.anomaly_map, (80, 96), interpolation=cv2.INTER_LINEAR),
                               atol=1e-6)
    np.testing.assert_array_equal(r.mask, r.anomaly_map > inspector.pixel_threshold)
    assert len(plain(frame)[0].stop_reasons) == 5 * 4  # scale 1.0: 96 x 80 in tiles at 0..64 and 0..48
    with pytest.raises(DataError, match="80 x 40 is 40 x 20 at the working scale 0.5, smaller than"):
        inspector(frame[:80, :40].copy())
    with pytest.raises(ConfigError, match="scale must be a finite number > 0, got 0"):
        Inspector.from_bundle(half, backend="onnxruntime", scale=0)
    with pytest.raises(ConfigError, match=r"tile_stride must be an integer in \[1, 32\].*got 33"):
        Inspector.from_bundle(half, backend="onnxruntime", tile_stride=33)


@pytest.fixture(scope="module")
def brick_bundle(tmp_path_factory):
    """The shipped brick-l2ae model exported to a bundle (its checkpoint predates the
    recorded scale: textures:brick tiles at scale 1.0)."""
    from pathlib import Path

    from eproj.export.onnx_graphs import export_bundle

    out = tmp_path_factory.mktemp("brick") / "bundle"
    export_bundle(Path(__file__).parents[2] / "eproj" / "models" / "brick-l2ae.pt", out)
    return out


@pytest.mark.parametrize("stride", [64, 96])
def test_a_defect_across_tile_borders_is_found_as_well_as_one_inside_a_tile(brick_bundle, stride):
    """The same dark spot on the same bricks, in 320-pixel frames (three tiles a side at
    either stride) cut so that it lies at the centre of the first tile, on each edge of a
    tile (where the second tile starts, where the first ends) and on each corner of four.
    Each is found alike: flagged, its pixels in the mask, and its mean map value at least
    95 % of the centred one. On the frame without it the blended map shows no seam: along
    the tile edges it is no higher than elsewhere."""
    from skimage import data

    brick = data.brick()
    cy, cx = 224, 224
    yy, xx = np.mgrid[:512, :512]
    spot = (yy - cy) ** 2 + (xx - cx) ** 2 <= 12 ** 2
    defective = np.where(spot, 10, brick).astype(np.uint8)
    inspector = Inspector.from_bundle(brick_bundle, backend="onnxruntime", max_iters=5, tile_stride=stride)
    assert (inspector.fit, inspector.scale, inspector.tile_stride) == ("tile", 1.0, stride)
    places = {"centre": (64, 64), "second starts": (64, stride), "first ends": (64, 128),
              "corner, starts": (stride, stride), "corner, ends": (128, 128)}
    found = {}
    for where, (py, px) in places.items():
        y, x = cy - py, cx - px
        r = inspector(defective[y:y + 320, x:x + 320].copy())[0]
        inside = spot[y:y + 320, x:x + 320]
        assert r.defect, f"{where}: score {r.score:.3f} under {inspector.score_threshold:.3f}"
        assert r.mask[inside].mean() >= 0.9, where
        found[where] = float(r.anomaly_map[inside].mean())
    # as well as centred: at least 95 % of its mean map value (tiles stopped after other step
    # counts are put on one scale by the calibration's map_scale, so more is fine)
    for where, value in found.items():
        assert value >= 0.95 * found["centre"], (where, found)
    clean = inspector(brick[192:512, 64:384].copy())[0].anomaly_map
    seams = np.zeros(clean.shape, bool)
    for edge in sorted({stride, 128, 2 * stride, 128 + stride}):  # where the tiles start and end
        seams[:, edge - 2:edge + 2] = seams[edge - 2:edge + 2, :] = True
    assert clean[seams].mean() <= 1.25 * clean[~seams].mean()


def test_side_by_side_tiles_show_the_seams_overlapping_tiles_remove(brick_bundle):
    """The seam check above can fail: at stride 128 (tiles side by side) the clean frame's map
    along the tile edges is more than 1.5 times its mean elsewhere."""
    from skimage import data

    clean = data.brick()[192:512, 64:384].copy()
    inspector = Inspector.from_bundle(brick_bundle, backend="onnxruntime", max_iters=5, tile_stride=128)
    amap = inspector(clean)[0].anomaly_map
    seams = np.zeros(amap.shape, bool)
    # 320-pixel frame: tiles at 0, 128 and 192 (the last one ends at the border); at 128 the first
    # two meet side by side, the only edge no other tile covers
    seams[:, 126:130] = seams[126:130, :] = True
    assert amap[seams].mean() > 1.5 * amap[~seams].mean()


# -- fail closed: frames, options and results that are not finite ---------------------------------

_HIDDEN_NAN = np.ma.masked_array(np.where(np.eye(32) > 0, np.nan, 0.5), mask=np.eye(32) > 0)
with warnings.catch_warnings():  # np.matrix warns that it is not recommended: it is built here on purpose
    warnings.simplefilter("ignore", PendingDeprecationWarning)
    _MATRIX = np.matrix(np.full((32, 32), 0.5))


@pytest.mark.parametrize("frames,message", [
    (_HIDDEN_NAN, r"frames: expected a plain NumPy array, got a masked array"),
    (np.ma.masked_array(np.full((32, 32), 7.0), mask=True), r"got a masked array"),
    ([np.ma.masked_array(np.full((32, 32), 0.5))], r"frame 0: expected a plain NumPy array, got a masked array"),
    (_MATRIX, r"got np\.matrix; pass np\.asarray\(frame\)"),
    (np.zeros((0, 32), np.uint8), r"frame 0: is empty \(0 x 32 x 1\)"),
    (np.zeros((2, 32, 0, 1), np.uint8), r"frame 0: is empty \(32 x 0 x 1\)"),
    (np.zeros((0, 32, 32, 1), np.uint8), "no frames: the batch is empty"),
    (np.full((32, 32), 1e300), r"float pixels must lie in \[0, 1\], got \[1e\+300, 1e\+300\]"),
    (np.where(np.eye(32) > 0, np.inf, 0.5).astype(np.float32), r"has NaN or Inf pixels \(32 of 1024 values\)"),
])
def test_frames_that_hide_or_lack_values_are_refused(inspector, frames, message):
    """Before, a masked array hiding NaN went through as its data (score -inf, no defect), and an
    empty frame crashed inside NumPy."""
    with pytest.raises(DataError, match=message):
        inspector(frames)


@pytest.mark.parametrize("options,message", [
    (dict(lam=float("nan")), "lam must be a finite number, got nan"),
    (dict(lam=float("inf")), "lam must be a finite number, got inf"),
    (dict(alpha=float("inf")), "alpha must be a finite number, got inf"),
    (dict(step="adam", adam_eps=0.0, adam_beta2=1.0), r"adam_beta2 must lie in \[0, 1\), got 1.0"),
    (dict(max_iters=10 ** 12), r"max_iters must lie in \[0, 100000\], got 1000000000000"),
    (dict(max_iters=2.5), r"max_iters must be an integer, got 2.5 \(float\)"),
    (dict(alpha="0.5"), r"alpha must be a number, got '0.5' \(str\)"),
    (dict(stop_threshold=float("inf")), "stop_threshold must be a finite number or -inf, got inf"),
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(batch_size=2.5), r"batch_size must be an integer, got 2.5 \(float\)"),
    (dict(batch_size=True), r"batch_size must be an integer, got True \(bool\)"),
    (dict(check_every=0), "check_every must be >= 1, got 0"),
    (dict(check_every="8"), r"check_every must be an integer, got '8' \(str\)"),
    (dict(channel_order="BGR"), r"channel_order must be one of \('bgr', 'rgb'\), got 'BGR'"),
    (dict(fit="crop"), r"fit must be one of \('none', 'resize', 'tile'\), got 'crop'"),
    (dict(method=1), r"method must be one of \('projection', 'reconstruction', 'ensemble'\), got 1 \(int\)"),
    (dict(threads=-1), "threads must be >= 0, got -1"),
    (dict(threads=1.5), r"threads must be an integer, got 1.5 \(float\)"),
    (dict(cuda_graphs="yes"), r"cuda_graphs must be True, False or None, got 'yes'"),
])
def test_bad_options_are_refused_where_they_enter(bundles, options, message):
    """Before, lam=nan, alpha=inf or Adam with eps 0 and beta2 1 gave score -inf and no defect, and
    max_iters=10**12 never ended."""
    with pytest.raises(ConfigError, match=message):
        Inspector.from_bundle(bundles["l2ae"][1], backend="onnxruntime", **options)


@pytest.fixture(scope="module")
def poisoned_bundle(bundles, tmp_path_factory):
    """The l2ae bundle with one weight of its step and forward graphs all NaN, re-hashed as a damaged
    export would be."""
    import os

    import onnx
    from onnx import numpy_helper

    from eproj.bundle import write_manifest

    src, dst = bundles["l2ae"][1], tmp_path_factory.mktemp("poisoned") / "bundle"
    dst.mkdir()
    poisoned = ("step.onnx", "forward.onnx")
    for p in src.iterdir():
        if p.name not in (*poisoned, "manifest.json"):
            os.link(p, dst / p.name)
    for name in poisoned:
        graph = onnx.load(str(src / name))
        weight = next(t for t in graph.graph.initializer if numpy_helper.to_array(t).size > 1
                      and numpy_helper.to_array(t).dtype == np.float32)
        weight.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(weight), np.nan), weight.name))
        onnx.save(graph, str(dst / name))
    manifest = json.loads((src / "manifest.json").read_text())
    write_manifest(dst, {k: v for k, v in manifest.items() if k not in ("schema_version", "files")})
    return dst


@pytest.mark.parametrize("method", ["projection", "reconstruction"])
def test_a_non_finite_result_fails_closed(poisoned_bundle, method):
    """Before, a NaN map scored -inf and answered defect=False."""
    from eproj.runtime.inspector import FAILED_SCORE

    inspector = Inspector.from_bundle(poisoned_bundle, backend="onnxruntime", method=method, max_iters=3,
                                      fit="none")
    results = inspector([_frame(0), _frame(1)])
    for r in results:
        assert r.failed and r.defect and r.score == FAILED_SCORE
        assert r.reason.startswith("non-finite result") or "; non-finite result" in r.reason
        assert "anomaly map has 1024 NaN/Inf values of 1024" in r.reason
        assert r.mask.all()  # no pixel of it can be vouched for
        json.dumps({"score": r.score, "defect": r.defect}, allow_nan=False)  # stays valid JSON


def test_auto_passes_over_cuda_backends_without_the_fused_cuda_kernels(bundles, monkeypatch):
    """A C++-only build (or a machine where the CUDA kernels cannot run) never gets a CUDA backend
    from auto, even where torch sees a GPU: the loop's update and DSSIM map need the kernels."""
    import torch

    import eproj.cpp_ext
    from eproj.runtime import backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(eproj.cpp_ext, "cuda_unavailable_reason", lambda: "built without CUDA kernels")
    bundle = backends.Bundle.load(bundles["l2ae"][1])
    assert backends._unavailable(bundle, "torch", "cuda", None) == \
        "the fused CUDA kernels cannot run: built without CUDA kernels"
    assert backends._unavailable(bundle, "torch", "cpu", None) == ""
    inspector = Inspector.from_bundle(bundles["l2ae"][1], fit="none")
    assert (inspector.backend.name, inspector.backend.device) == ("onnxruntime", "cpu")
    assert "torch on cuda (the fused CUDA kernels cannot run: built without CUDA kernels)" in inspector.backend_note
