import pytest
import torch

from eproj.errors import ConfigError
from eproj.train.models import FAMILIES, ModelConfig, build_model


@pytest.mark.parametrize("family", FAMILIES)
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
