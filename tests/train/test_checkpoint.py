import os

import pytest
import torch

from eproj.errors import CheckpointError
from eproj.train.checkpoint import MODEL_FORMAT, FORMAT_VERSION, load_model, load_payload, save_atomic
from eproj.train.models import ModelConfig, build_model


def _model_payload(config: ModelConfig, **extra):
    model = build_model(config)
    payload = {"format": MODEL_FORMAT, "version": FORMAT_VERSION, "config": config.to_dict(), "train": {},
               "step": 3, "model": model.state_dict(),
               "calibration": {"stop_threshold": 1.0, "segmentation": {}}}
    payload.update(extra)
    return model, payload


def test_round_trip(tmp_path):
    config = ModelConfig(family="gvae", size=32, latent=4)
    model, payload = _model_payload(config)
    save_atomic(payload, tmp_path / "model.pt")
    loaded = load_model(tmp_path)
    assert loaded.config == config and not loaded.model.training
    for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_corrupted_truncated_and_foreign_files(tmp_path):
    _, payload = _model_payload(ModelConfig(size=32, latent=4))
    path = tmp_path / "model.pt"
    save_atomic(payload, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_model(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupted"):
        load_model(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_arbitrary_objects_are_never_unpickled(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"format": MODEL_FORMAT, "version": FORMAT_VERSION, "evil": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="corrupted or not an eproj file"):
        load_payload(path, MODEL_FORMAT)


def test_wrong_format_version_and_mismatched_weights(tmp_path):
    config = ModelConfig(size=32, latent=4)
    _, payload = _model_payload(config, version=99)
    save_atomic(payload, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_model(tmp_path / "a.pt")
    _, payload = _model_payload(config, format="something-else")
    save_atomic(payload, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="format tag 'something-else'"):
        load_model(tmp_path / "b.pt")
    _, payload = _model_payload(config)
    payload["config"] = {**config.to_dict(), "latent": 5}
    save_atomic(payload, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="do not fit the stored model config"):
        load_model(tmp_path / "c.pt")


def test_pytorch_advice_to_load_without_weights_only_is_not_repeated(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"format": MODEL_FORMAT, "version": FORMAT_VERSION, "evil": _Exploit()}, path)
    with pytest.raises(CheckpointError, match=r"objects other than tensors.*posix.system") as info:
        load_payload(path, MODEL_FORMAT)
    assert "weights_only" not in str(info.value) and "trusted" not in str(info.value)


def test_a_config_claiming_a_larger_model_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    """A 2 MB file whose config claims latent=200000 once allocated 3.5 GB before failing: the
    stored shapes are now compared with a model built on the meta device, which allocates nothing."""
    import eproj.train.checkpoint as checkpoint

    config = ModelConfig(size=32, latent=4)
    _, payload = _model_payload(config)
    payload["config"] = {**config.to_dict(), "size": 128, "latent": 200000}
    save_atomic(payload, tmp_path / "model.pt")
    built = []

    def recording_build(cfg):
        model = build_model(cfg)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(checkpoint, "build_model", recording_build)
    with pytest.raises(CheckpointError, match=r"do not fit the stored model config .*latent=200000.*: "
                                              r"encoder\.\d+\.weight has shape \(4, 32, 2, 2\), "
                                              r"the config implies \(200000, 32, 8, 8\)"):
        load_model(tmp_path)
    assert built == ["meta"]


def test_a_zip_bomb_is_refused_before_it_is_unpacked(tmp_path):
    import zipfile

    _, payload = _model_payload(ModelConfig(size=32, latent=4))
    save_atomic(payload, tmp_path / "good.pt")
    bomb = tmp_path / "model.pt"
    with zipfile.ZipFile(tmp_path / "good.pt") as good, zipfile.ZipFile(bomb, "w") as out:
        for member in good.infolist():
            out.writestr(member, good.read(member))
        prefix = good.namelist()[0].split("/")[0]
        out.writestr(f"{prefix}/data/999", bytes(64 << 20), compress_type=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 4 << 20
    with pytest.raises(CheckpointError, match=r"zip members unpack to \d+ bytes from a \d+-byte file.*zip bomb"):
        load_model(bomb)


def _poisoned(tmp_path, where: str):
    config = ModelConfig(size=32, latent=4)
    _, payload = _model_payload(config)
    if where == "weight":
        state = {k: v.clone() for k, v in payload["model"].items()}
        state["encoder.0.weight"].view(-1)[3] = float("nan")
        payload["model"] = state
    elif where == "stop_threshold":
        payload["calibration"]["stop_threshold"] = float("inf")
    else:
        payload["calibration"]["segmentation"] = {"projection": {"dssim": float("nan"), "score": 0.2}}
    save_atomic(payload, tmp_path / "model.pt")
    return tmp_path / "model.pt"


@pytest.mark.parametrize("where,message", [
    ("weight", r"weight encoder\.0\.weight has 1 NaN/Inf values of \d+"),
    ("stop_threshold", r"calibration field stop_threshold must be a finite number, got inf"),
    ("segmentation", r"calibration field segmentation\.projection\.dssim must be a finite number, got nan"),
])
def test_non_finite_weights_and_calibration_are_refused(tmp_path, where, message):
    with pytest.raises(CheckpointError, match=message):
        load_model(_poisoned(tmp_path, where))


def test_weights_of_another_kind_are_refused(tmp_path):
    config = ModelConfig(size=32, latent=4)
    _, payload = _model_payload(config)
    payload["model"] = {**payload["model"], "encoder.0.weight": torch.zeros(payload["model"]["encoder.0.weight"].shape,
                                                                           dtype=torch.int64)}
    save_atomic(payload, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"encoder\.0\.weight must be a floating-point tensor, got torch.int64"):
        load_model(tmp_path / "a.pt")
    _, payload = _model_payload(config)
    payload["config"] = {**config.to_dict(), "latent": "4"}
    save_atomic(payload, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="the stored model config is not valid"):
        load_model(tmp_path / "b.pt")
