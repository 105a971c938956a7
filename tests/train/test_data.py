
import numpy as np
import pytest

from conftest import make_mvtec, texture, write_image
from eproj.errors import DataError
from eproj.train.data import load_source, tile, untile
from eproj.train.defects import DEFECT_KINDS, add_defect


def test_mvtec_loader_on_a_generated_folder(mvtec_folder):
    source = load_source(f"mvtec:{mvtec_folder}", size=32)
    assert source.kind == "object" and source.channels == 1
    assert len(source.train_files) + len(source.validation_files) == 6
    assert not set(source.train_files) & set(source.validation_files)
    batch = source.train_batch(np.random.default_rng(0), 5)
    assert batch.shape == (5, 1, 32, 32) and batch.dtype == np.float32
    assert source.validation().shape == (1, 1, 32, 32)
    test = source.test()
    assert [s.name for s in test] == ["crack_000", "crack_001", "good_000", "good_001"]
    assert [s.label for s in test] == [1, 1, 0, 0]
    assert all(s.image.shape == (32, 32, 1) and s.mask.shape == (32, 32) for s in test)
    assert test[0].mask.any() and not test[2].mask.any()


def test_mvtec_texture_categories_are_tiled(tmp_path):
    root = make_mvtec(tmp_path / "carpet", size=64, n_train=3)
    source = load_source(f"mvtec:{root}", size=32)
    assert source.kind == "texture"
    assert source.test()[0].image.shape == (64, 64, 1)
    assert source.validation().shape == (4, 1, 32, 32)  # one 64x64 image in 4 tiles
    assert source.train_batch(np.random.default_rng(0), 3).shape == (3, 1, 32, 32)


def test_rgb_category(tmp_path):
    root = make_mvtec(tmp_path / "hazelnut", channels=3)
    source = load_source(f"mvtec:{root}", size=32)
    assert source.channels == 3 and source.test()[0].image.shape == (32, 32, 3)


def test_folder_with_optional_masks(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "mine"
    for i in range(3):
        write_image(root / "train" / f"{i}.png", texture(rng, 40))
    write_image(root / "test" / "good" / "a.png", texture(rng, 40))
    write_image(root / "test" / "dent" / "b.png", texture(rng, 40))
    test = load_source(f"folder:{root}", size=32).test()
    assert [(s.name, s.label, s.mask is None) for s in test] == [("dent_b", 1, True), ("good_a", 0, False)]


def test_texture_regions_are_disjoint_and_test_set_is_seeded():
    source = load_source("textures:brick", size=128)
    train, val, test = source.train_region, source.validation_region, source.test_region
    assert train.shape[:2] == (256, 512) and val.shape[:2] == (256, 256) and test.shape[:2] == (256, 256)
    assert train.size + val.size + test.size == 512 * 512
    from eproj.train.data import _embedded_texture

    whole = _embedded_texture("brick")  # validation and test: the bottom half's left and right halves
    assert np.array_equal(train, whole[:256]) and np.array_equal(val, whole[256:, :256])
    assert np.array_equal(test, whole[256:, 256:])
    a, b = source.test(), load_source("textures:brick", size=128).test()
    assert [s.name for s in a] == [s.name for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert {s.defect for s in a} >= {"good", "scratch", "stain", "hole", "patch"}
    assert source.validation().shape == (24, 1, 128, 128)
    batch = source.train_batch(np.random.default_rng(0), 64)
    assert batch.shape == (64, 1, 128, 128) and batch.flags.c_contiguous
    # every training crop, flipped or not, is a crop of the training strip
    strip = train[:, :, 0]
    for crop in batch[:8, 0]:
        found = False
        for c in (crop, crop[::-1], crop[:, ::-1], crop[::-1, ::-1]):
            ys, xs = np.nonzero(np.isclose(strip[:-127, :-127], c[0, 0]))
            found |= any(np.array_equal(strip[y:y + 128, x:x + 128], c) for y, x in zip(ys, xs))
        assert found


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defects_change_only_pixels_inside_their_mask(kind):
    rng = np.random.default_rng(5)
    image = texture(rng, 96)[:, :, None]
    foreign = [np.full((128, 128, 1), 0.9, np.float32)]
    out, mask, got = add_defect(rng, image, foreign, kind)
    assert got == kind and out.shape == image.shape and mask.dtype == bool
    assert np.array_equal(out[~mask], image[~mask])
    assert mask.sum() > 20
    assert np.mean(np.abs(out[mask] - image[mask]) > 0.02) > 0.5


def test_tile_untile_round_trip():
    image = np.arange(64 * 96, dtype=np.float32).reshape(64, 96, 1)
    tiles = tile(image, 32)
    assert len(tiles) == 6
    np.testing.assert_array_equal(untile(np.stack(tiles), (64, 96)), image)
    assert len(tile(np.zeros((50, 64, 1)), 32)) == 4  # rows at 0 and 18: the last ends at the border
    with pytest.raises(DataError, match="image of 64x20 is smaller than the 32x32 tiles"):
        tile(np.zeros((20, 64, 1)), 32)


def test_bad_input_gives_clear_errors(tmp_path, mvtec_folder):
    with pytest.raises(DataError, match="does not exist"):
        load_source(f"mvtec:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="textures:NAME"):
        load_source("brick")
    with pytest.raises(DataError, match="unknown data scheme"):
        load_source("http:brick")
    with pytest.raises(DataError, match="no such file"):
        load_source("textures:marble")
    # an image of the wrong size among the training images
    write_image(mvtec_folder / "train" / "good" / "999.png", texture(np.random.default_rng(0), 30))
    with pytest.raises(DataError, match=r"is 30x30; expected 48x48"):
        src = load_source(f"mvtec:{mvtec_folder}", size=32)
        src.train_sample(10)
        src.validation()
    (mvtec_folder / "train" / "good" / "999.png").unlink()
    # wrong channels in the test set
    write_image(mvtec_folder / "test" / "crack" / "005.png", np.random.rand(48, 48, 3))
    with pytest.raises(DataError, match=r"3 channel\(s\); expected 1"):
        load_source(f"mvtec:{mvtec_folder}", size=32).test()
    # a defect image without its mask
    (mvtec_folder / "test" / "crack" / "005.png").unlink()
    write_image(mvtec_folder / "test" / "crack" / "006.png", texture(np.random.default_rng(1), 48))
    with pytest.raises(DataError, match="has no mask"):
        load_source(f"mvtec:{mvtec_folder}", size=32).test()
    # a truncated image file
    (mvtec_folder / "test" / "crack" / "006.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(DataError, match="cannot read image"):
        load_source(f"mvtec:{mvtec_folder}", size=32).test()


def test_empty_test_set_and_missing_train_images(tmp_path):
    root = make_mvtec(tmp_path / "cable", n_test=0)
    (root / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="test set .* is empty"):
        load_source(f"mvtec:{root}", size=32).test()
    empty = tmp_path / "empty" / "train" / "good"
    empty.mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_source(f"mvtec:{empty.parent.parent}", size=32)


def test_texture_sources_record_their_fit_and_working_scale(tmp_path):
    """MVTec textures and folders with fit "tile" are resized by the working scale (512 on
    the shorter side, a multiple of the model size) keeping their aspect; the source
    records the fit and the factor. textures: specs always tile."""
    from eproj.train.data import fit_of

    carpet = make_mvtec(tmp_path / "carpet", size=640, n_train=2, n_test=1)
    source = load_source(f"mvtec:{carpet}", size=128)
    assert source.input_record() == {"fit": "tile", "scale": 0.8}
    assert source.test()[0].image.shape == (512, 512, 1)
    rng = np.random.default_rng(0)
    root = tmp_path / "fabric"
    for i in range(3):
        write_image(root / "train" / f"{i}.png", texture(rng, 100)[:, :70])
    write_image(root / "test" / "good" / "a.png", texture(rng, 100)[:, :70])
    assert fit_of(f"folder:{root}") == "resize" and load_source(f"folder:{root}", size=32).kind == "object"
    tiled = load_source(f"folder:{root}", size=32, fit="tile")
    assert tiled.kind == "texture" and tiled.input_record() == {"fit": "tile", "scale": 64 / 70}
    assert tiled.test()[0].image.shape == (91, 64, 1)  # 100 x 70 -> 91 x 64: the aspect kept
    assert tiled.validation().shape == (3 * 2, 1, 32, 32)  # rows at 0, 32, 59; columns at 0, 32
    assert fit_of("textures:brick") == "tile" and load_source("textures:brick").input_record()["scale"] == 1.0
    assert fit_of(f"mvtec:{carpet}", "resize") == "resize"
    with pytest.raises(DataError, match="a texture image is cut into crops, so its fit is tile; got fit 'resize'"):
        load_source("textures:brick", fit="resize")
    with pytest.raises(DataError, match=r"fit must be one of \('tile', 'resize'\), got 'none'"):
        load_source(f"folder:{root}", fit="none")


def test_the_checkpoint_records_the_fit_and_the_bundle_carries_it(tmp_path, capsys):
    from eproj.export.onnx_graphs import _input_geometry
    from eproj.train.checkpoint import load_payload
    from eproj.train.models import ModelConfig
    from eproj.train.trainer import TrainConfig, train

    rng = np.random.default_rng(1)
    root = tmp_path / "fabric"
    for i in range(3):
        write_image(root / "train" / f"{i}.png", texture(rng, 80))
    path = train(tmp_path / "run", ModelConfig(family="l2ae", size=32, latent=8),
                 TrainConfig(data=f"folder:{root}", steps=1, batch=2, fit="tile"), calibrate_after=False)
    assert "fit tile (--fit); working scale 0.8" in capsys.readouterr().err
    record = load_payload(path, "eproj-checkpoint")["train"]
    assert record["fit"] == "tile" and record["input"] == {"fit": "tile", "scale": 0.8}
    assert _input_geometry(record) == {"fit": "tile", "scale": 0.8, "scale_recorded": True}
    old = {"data": "mvtec:/x/carpet", "steps": 10}  # a checkpoint from before the record
    assert _input_geometry(old) == {"fit": "tile", "scale": 1.0, "scale_recorded": False}
    assert _input_geometry({"data": "folder:/x"}) == {"fit": "resize", "scale": None, "scale_recorded": False}


def test_a_run_with_fit_tile_is_calibrated_and_evaluated_on_tiles(tmp_path):
    """--fit tile on a folder: model.pt is calibrated on the folder's validation tiles
    (4 per 80 x 80 image at working scale 0.8, model size 32, flipped copies doubling them), and
    evaluation tiles the test images at the recorded fit instead of resizing them."""
    from eproj.train.checkpoint import load_model
    from eproj.train.evaluate import evaluate
    from eproj.train.models import ModelConfig
    from eproj.train.trainer import TrainConfig, train

    rng = np.random.default_rng(2)
    root = tmp_path / "fabric"
    for i in range(3):
        write_image(root / "train" / f"{i}.png", texture(rng, 80))
    write_image(root / "test" / "good" / "0.png", texture(rng, 80))
    path = train(tmp_path / "run", ModelConfig(family="l2ae", size=32, latent=8),
                 TrainConfig(data=f"folder:{root}", steps=1, batch=2, fit="tile"), progress=False)
    trained = load_model(path)
    assert trained.calibration["validation_images"] == 2 * 4
    report, results = evaluate(trained, f"folder:{root}", "projection", progress=False, max_iters=2)
    assert results[0].maps["dssim"].shape == (64, 64)  # the 80 x 80 image at scale 0.8, tiled, not resized to 32
    assert len(results[0].tile_iterations) == 4
