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
