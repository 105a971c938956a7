import pytest
import torch

from eproj.errors import ConfigError
from eproj.train.models import FAMILIES, ModelConfig, UNet, build_model, parameter_count

AUTOENCODERS = [f for f in FAMILIES if f != "unet"]


@pytest.mark.parametrize("family", AUTOENCODERS)
@pytest.mark.parametrize("architecture,size", [("bergmann", 128), ("zimmerer", 64)])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(family, architecture, size, channels):
    model = build_model(ModelConfig(family=family, architecture=architecture, size=size, channels=channels))
    x = torch.rand(2, channels, size, size)
    mu, logvar = model.encode(x)
    assert mu.shape == (2, 100, 1, 1)
    assert (logvar is not None) == (family in ("vae", "gvae"))
    y = model(x)
    assert y.shape == x.shape
    assert 0 <= float(y.detach().min()) and float(y.detach().max()) <= 1


def test_bergmann_layers_follow_the_paper():
    model = build_model(ModelConfig(family="l2ae"))
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 32, 64, 64, 128, 64, 32, 100]
    assert [c.kernel_size[0] for c in convs] == [4, 4, 3, 4, 3, 4, 3, 3, 8]
    assert [c.stride[0] for c in convs] == [2, 2, 1, 2, 1, 2, 1, 1, 1]
    acts = [m for m in model.encoder if isinstance(m, torch.nn.LeakyReLU)]
    assert len(acts) == 8 and all(a.negative_slope == 0.2 for a in acts)
    deconvs = [m for m in model.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [c.kernel_size[0] for c in deconvs] == [8, 3, 3, 4, 3, 4, 3, 4, 4]
    assert isinstance(model.decoder[-1], torch.nn.Sigmoid)


def test_zimmerer_feature_maps():
    model = build_model(ModelConfig(family="vae", architecture="zimmerer", size=64))
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 256, 200]


@pytest.mark.parametrize("bad", [dict(family="gan"), dict(size=100), dict(channels=2), dict(latent=0),
                                 dict(beta=0.0), dict(architecture="unet"), dict(decoder_variance=0.0)])
def test_bad_config_is_a_clear_error(bad):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**bad)
    assert str(list(bad.values())[0]) in str(info.value)


def test_config_round_trip_and_unknown_keys():
    cfg = ModelConfig(family="vae", beta=2.0)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown"):
        ModelConfig.from_dict({**cfg.to_dict(), "depth": 3})


@pytest.mark.parametrize("family", ["vae", "gvae"])
def test_variational_posteriors_start_narrow(family):
    from eproj.train.models import LOGVAR_INIT

    model = build_model(ModelConfig(family=family, size=32, latent=8))
    _, logvar = model.encode(torch.rand(4, 1, 32, 32))
    # the bias dominates at initialisation: std ~ exp(LOGVAR_INIT / 2), far below 1
    assert float(logvar.detach().mean()) == pytest.approx(LOGVAR_INIT, abs=0.5)


@pytest.mark.parametrize("architecture,size", [("bergmann", 128), ("zimmerer", 64)])
def test_signal_reaches_the_bottleneck_at_initialisation(architecture, size):
    # PyTorch's default initialisation shrinks the signal on its way to the 1x1 bottleneck,
    # so a fresh model outputs a near-constant image; He initialisation keeps it.
    torch.manual_seed(0)
    model = build_model(ModelConfig(architecture=architecture, size=size))
    x = torch.rand(8, 1, size, size)
    with torch.no_grad():
        he = float(model.encode(x)[0].std())
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                module.reset_parameters()  # PyTorch's default
        default = float(model.encode(x)[0].std())
    assert he > 0.2
    assert default < 0.1 * he


@pytest.mark.parametrize("channels", [1, 3])
def test_unet_shapes_levels_and_output_range(channels):
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="unet", size=128, channels=channels, width=4))
    assert isinstance(model, UNet) and model.config.architecture == "unet"
    x = torch.rand(2, channels, 128, 128)
    features, code = model.encode(x)
    assert code is None
    assert [tuple(f.shape[1:]) for f in features] == [(4, 128, 128), (8, 64, 64), (16, 32, 32), (32, 16, 16),
                                                      (32, 8, 8)]
    y = model(x).detach()
    assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1
    assert isinstance(model.out[-1], torch.nn.Sigmoid)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_unet_follows_the_standard_layout():
    """Double 3x3 conv + ReLU blocks of widths w, 2w, 4w, 8w, 8w; up blocks take the concatenation
    (2 widths[l] channels); at w = 64 the parameter count is the standard (bias, no batch norm) U-Net's."""
    model = build_model(ModelConfig(family="unet", width=64))
    down = [[m.out_channels for m in block if isinstance(m, torch.nn.Conv2d)] for block in model.down]
    assert down == [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]
    up = [[(m.in_channels, m.out_channels) for m in block if isinstance(m, torch.nn.Conv2d)] for block in model.up]
    assert up == [[(128, 64), (64, 64)], [(256, 128), (128, 64)], [(512, 256), (256, 128)],
                  [(1024, 512), (512, 256)]]
    assert all(m.kernel_size == (3, 3) and m.padding == (1, 1) for block in [*model.down, *model.up]
               for m in block if isinstance(m, torch.nn.Conv2d))
    assert parameter_count(model) == 17_257_409  # about 17 M, as the issue says of the authors' network
    assert parameter_count(build_model(ModelConfig(family="unet"))) == 1_079_537  # w = 16, the CPU default


@pytest.mark.parametrize("bad,message", [
    (dict(family="unet", architecture="bergmann"), "unet family runs on the unet architecture"),
    (dict(family="l2ae", architecture="unet"), "unet family runs on the unet architecture"),
    (dict(family="unet", width=0), "width must be an integer in [1, 256], got 0"),
    (dict(family="unet", width=2.5), "got 2.5"),
])
def test_bad_unet_config_is_a_clear_error(bad, message):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**bad)
    assert message in str(info.value)


def test_the_architecture_follows_the_family_by_default():
    assert ModelConfig().architecture == "bergmann" and ModelConfig(family="unet").architecture == "unet"
    cfg = ModelConfig(family="unet", width=8)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    old = ModelConfig().to_dict()
    del old["width"]  # a checkpoint written before the U-Net
    assert ModelConfig.from_dict(old) == ModelConfig()
