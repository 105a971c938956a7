import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage import transform

from eproj.errors import CheckpointError, ConfigError
from eproj.train import perceptual as P


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _has_efficientnet_package() -> bool:
    try:
        P.efficientnet_weights_path()
    except ConfigError:
        return False
    return True


needs_package = pytest.mark.skipif(not _has_efficientnet_package(),
                                   reason=f"{P.EFFICIENTNET_PACKAGE} is not installed")


def _photo(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, size, size) float32 in [0, 1]."""
    resized = transform.resize(image, (size, size), anti_aliasing=True).astype(np.float32)
    return torch.from_numpy(resized.transpose(2, 0, 1)[None].copy())


# ---------------------------------------------------------------- the loss against its formula

def test_relative_perceptual_l1_matches_the_formula_on_small_tensors():
    rng = np.random.default_rng(0)
    fx, fy = rng.normal(size=(2, 3, 2, 2)), rng.normal(size=(2, 3, 2, 2))
    expected = [np.abs(fx[i] - fy[i]).sum() / np.abs(fx[i]).sum() for i in range(2)]
    got = P.relative_perceptual_l1_features(torch.from_numpy(fx), torch.from_numpy(fy))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    # a hand value: fx = [1, -2], fy = [0, 0] -> (1 + 2) / (1 + 2) = 1; fy = [1, -1] -> 1 / 3
    one = torch.tensor([[[[1.0, -2.0]]]])
    assert P.relative_perceptual_l1_features(one, torch.zeros_like(one)).item() == pytest.approx(1.0)
    assert P.relative_perceptual_l1_features(one, torch.tensor([[[[1.0, -1.0]]]])).item() == pytest.approx(1 / 3)


def test_relative_perceptual_l1_normalises_by_mu_sigma_per_channel():
    """Eq. 3: f~ = (f - mu) / sigma per channel, then Eq. 4, with a fixed linear 'network'."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 4, 1)
    stats = P.FeatureStats(torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([1.0, 2.0, 0.5, 4.0]), "identity")
    x, y = torch.rand(2, 3, 5, 5), torch.rand(2, 3, 5, 5)
    with torch.no_grad():
        fx = (net(x) - stats.mean.view(1, -1, 1, 1)) / stats.std.view(1, -1, 1, 1)
        fy = (net(y) - stats.mean.view(1, -1, 1, 1)) / stats.std.view(1, -1, 1, 1)
        expected = (fx - fy).abs().sum((1, 2, 3)) / fx.abs().sum((1, 2, 3))
        got = P.relative_perceptual_l1(net, stats, x, y)
    torch.testing.assert_close(got, expected)
    assert torch.all(P.relative_perceptual_l1(net, stats, x, x) == 0)


def test_relative_perceptual_l1_rejects_mismatched_features():
    with pytest.raises(ConfigError, match=r"same shape.*\(1, 2, 3, 3\).*\(1, 2, 4, 4\)"):
        P.relative_perceptual_l1_features(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 4, 4))


def test_feature_stats_are_measured_per_channel_over_images_and_positions():
    net = torch.nn.Identity()
    a, b = torch.rand(3, 2, 4, 4), torch.rand(2, 2, 4, 4)
    stats = P.measure_feature_stats(net, [a, b])
    both = torch.cat([a, b]).transpose(0, 1).reshape(2, -1).double()
    torch.testing.assert_close(stats.mean, both.mean(1).float())
    torch.testing.assert_close(stats.std, both.std(1, correction=0).float())
    assert stats.source == "training-images" and stats.count == 5
    with pytest.raises(ConfigError, match="at least one training image"):
        P.measure_feature_stats(net, [])
    with pytest.raises(ConfigError, match="source must be one of"):
        P.FeatureStats(torch.zeros(2), torch.ones(2), "made-up")


def test_feature_distance_map_sums_channels_at_input_size():
    net = torch.nn.AvgPool2d(4)
    stats = P.FeatureStats(torch.zeros(3), torch.ones(3), "identity")
    x = torch.rand(2, 3, 16, 16)
    m = P.feature_distance_map(net, stats, x, x.flip(-1))
    assert m.shape == (2, 16, 16) and bool((m >= 0).all())
    assert torch.all(P.feature_distance_map(net, stats, x, x) == 0)


# ---------------------------------------------------------------- VGG-19 from a torchvision state dict

def _vgg_state(**overrides) -> dict:
    needed, _ = P.vgg19_expected_shapes()
    state = {name: torch.randn(shape) * 0.01 for name, shape in needed.items()}
    state.update(overrides)
    return state


def test_vgg19_loads_a_torchvision_state_dict_with_the_right_names(tmp_path):
    state = _vgg_state()
    state["features.34.bias"] = torch.zeros(512)  # a later layer of the full file is accepted
    path = tmp_path / P.VGG19_FILE_NAME
    torch.save(state, path)
    net = P.build_feature_network("vgg19", weights=path)
    torch.testing.assert_close(net.features[21].weight, state["features.21.weight"])
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    out = net(torch.rand(2, 1, 32, 40))  # grey images are repeated to 3 channels
    assert out.shape == (2, 512, 4, 5) and bool((out >= 0).all())  # stride 8, after a ReLU
    # torchvision's layer indices: conv4_2 is features.21, relu4_2 features.22 (features[:23])
    assert len(net.features) == 23 and isinstance(net.features[22], torch.nn.ReLU)



def test_vgg19_forward_is_torchvisions_layer_order(tmp_path):
    """conv-ReLU pairs and 2x2 max-pools in torchvision's order, written out with the file's tensors."""
    torch.manual_seed(0)
    needed, _ = P.vgg19_expected_shapes()
    state = {name: torch.randn(shape) * (0.3 if name.endswith("weight") else 0.1) for name, shape in needed.items()}
    torch.save(state, tmp_path / P.VGG19_FILE_NAME)
    net = P.vgg19_from_file(tmp_path / P.VGG19_FILE_NAME)
    x = torch.rand(1, 3, 24, 24)
    h = (x - torch.tensor(P.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(P.IMAGENET_STD).view(1, 3, 1, 1)
    for i in (0, 2, "M", 5, 7, "M", 10, 12, 14, 16, "M", 19, 21):
        if i == "M":
            h = torch.nn.functional.max_pool2d(h, 2)
        else:
            h = torch.relu(torch.nn.functional.conv2d(h, state[f"features.{i}.weight"], state[f"features.{i}.bias"],
                                                      padding=1))
    with torch.no_grad():
        torch.testing.assert_close(net(x), h)

@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("features.19.weight"), r"missing 1 tensor.*features\.19\.weight"),
    (lambda s: s.__setitem__("features.21.weight", torch.zeros(512, 256, 3, 3)),
     r"features\.21\.weight has shape \(512, 256, 3, 3\), VGG-19 has \(512, 512, 3, 3\)"),
    (lambda s: s.__setitem__("features.3.weight", torch.zeros(64, 64, 3, 3)), r"unexpected tensor 'features\.3"),
    (lambda s: s.__setitem__("classifier.6.bias", torch.zeros(10)),
     r"classifier\.6\.bias has shape \(10,\), VGG-19 has \(1000,\)"),
    (lambda s: s.__setitem__("features.0.bias", torch.full((64,), float("nan"))), "NaN or Inf"),
])
def test_vgg19_refuses_wrong_names_and_shapes(tmp_path, damage, message):
    state = _vgg_state()
    damage(state)
    path = tmp_path / P.VGG19_FILE_NAME
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=message):
        P.vgg19_from_file(path)


def test_vgg19_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        P.vgg19_from_file(tmp_path / "nope.pth")
    (tmp_path / "text.pth").write_text("not a state dict")
    with pytest.raises(CheckpointError, match="not a readable torch state-dict"):
        P.vgg19_from_file(tmp_path / "text.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="must hold a state dict.*got list"):
        P.vgg19_from_file(tmp_path / "list.pth")


def test_random_feature_networks_are_refused_unless_asked_for():
    with pytest.raises(ConfigError, match="randomly initialised feature network is refused"):
        P.build_feature_network("vgg19")
    with pytest.raises(ConfigError, match="must be one of"):
        P.build_feature_network("resnet50")
    net = P.build_feature_network("vgg19", allow_random=True)
    assert net(torch.rand(1, 3, 16, 16)).shape == (1, 512, 2, 2)
    lite = P.build_feature_network("efficientnet-lite0", tap="stage4", allow_random=True)
    assert lite(torch.rand(1, 3, 64, 64)).shape == (1, 80, 4, 4)


# ---------------------------------------------------------------- EfficientNet-Lite0 from the package

def test_efficientnet_same_padding_gives_ceil_sizes():
    net = P.build_feature_network("efficientnet-lite0", tap="stage3", allow_random=True)
    assert net(torch.rand(1, 3, 64, 64)).shape == (1, 40, 8, 8)
    assert net(torch.rand(1, 1, 50, 37)).shape == (1, 40, 7, 5)  # ceil(50/8), ceil(37/8)


@needs_package
def test_efficientnet_lite0_classifies_scikit_image_photographs():
    """The full network built here with the package's weights names chelsea a cat and coffee a
    cup of coffee within its top 5: a wrong conversion (layer order, padding, BN, input scale) fails here."""
    net = P.efficientnet_lite0_from_file(P.efficientnet_weights_path(), full=True)
    cats, cups = {281, 282, 285}, {967, 968, 504}  # tabby, tiger cat, Egyptian cat; espresso, cup, coffee mug
    with torch.no_grad():
        logits = net.logits(torch.cat([_photo(skdata.chelsea()), _photo(skdata.coffee())]))
    top5 = logits.topk(5, dim=1).indices.tolist()
    assert top5[0][0] in cats and top5[1][0] in cups, top5  # measured: 285 (0.79) and 967 (0.91)
    assert len(cats & set(top5[0])) >= 2 and len(cups & set(top5[1])) >= 2, top5


@needs_package
def test_efficientnet_features_come_from_the_package_weights():
    path = P.efficientnet_weights_path()
    full = P.efficientnet_lite0_from_file(path, full=True)
    net = P.build_feature_network("efficientnet-lite0", tap="stage3")
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    assert len(net._blocks) == 5  # only the layers up to the tap are built
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), full(x))
    x.requires_grad_(True)
    P.relative_perceptual_l1(net, P.FeatureStats(torch.zeros(40), torch.ones(40), "identity"),
                             x, x.flip(-1)).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and x.grad.abs().sum() > 0


@needs_package
def test_efficientnet_loader_checks_names_and_shapes(tmp_path):
    state = torch.load(P.efficientnet_weights_path(), map_location="cpu", weights_only=True)
    state["_blocks.3._project_conv.weight"] = torch.zeros(40, 96, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"_blocks\.3\._project_conv\.weight has shape \(40, 96, 1, 1\), "
                                              r"EfficientNet-Lite0 has \(40, 144, 1, 1\)"):
        P.efficientnet_lite0_from_file(tmp_path / "bad.pth")
    del state["_fc.bias"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match=r"missing \['_fc\.bias'\]"):
        P.efficientnet_lite0_from_file(tmp_path / "short.pth")


def test_feature_record_names_the_network_layer_and_weight_file(tmp_path):
    path = tmp_path / P.VGG19_FILE_NAME
    torch.save(_vgg_state(), path)
    record = P.feature_record("vgg19", path)
    assert record["network"] == "vgg19" and record["tap"] == "relu4_2" and record["weights"] == P.VGG19_FILE_NAME
    import hashlib
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    torch.save(_vgg_state(), path)  # other weights, same name: another record
    assert P.feature_record("vgg19", path) != record
    with pytest.raises(ConfigError, match="needs --perceptual-weights"):
        P.feature_record("vgg19")
    with pytest.raises(CheckpointError, match="does not exist"):
        P.feature_record("efficientnet-lite0", tmp_path / "missing.pth")
