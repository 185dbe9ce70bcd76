"""The weights resolver: order, hash check, safe loading, and no network access ever."""

from __future__ import annotations

import hashlib
import socket

import pytest
import torch

from fid import weights as W
from fid.inception import InceptionFeatures


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a socket or use torch.hub's downloader fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(W.ENV_VAR, raising=False)
    d = tmp_path / "torch" / "hub" / "checkpoints"
    assert W.hub_checkpoint_dir() == d
    return d


def test_missing_weights_error_names_the_file_url_and_place(hub):
    with pytest.raises(W.InceptionWeightsError) as e:
        W.resolve_inception_weights()
    msg = str(e.value)
    assert W.WEIGHTS_URL in msg and W.WEIGHTS_SHA256 in msg
    assert str(hub / W.WEIGHTS_NAMES[0]) in msg and str(hub / W.WEIGHTS_NAMES[1]) in msg
    assert W.ENV_VAR in msg
    with pytest.raises(W.InceptionWeightsError, match="InceptionFeatures|not found"):
        InceptionFeatures.from_weights()  # torch-fidelity must not fall back to its download


def test_wrong_hash_is_refused_everywhere(hub, tmp_path, monkeypatch):
    hub.mkdir(parents=True)
    bad = hub / W.WEIGHTS_NAMES[1]  # pytorch-fid's name is accepted, but the bytes are wrong
    bad.write_bytes(b"not inception")
    with pytest.raises(W.InceptionWeightsError, match="expected " + W.WEIGHTS_SHA256):
        W.resolve_inception_weights()
    monkeypatch.setenv(W.ENV_VAR, str(bad))
    with pytest.raises(W.InceptionWeightsError, match="has SHA-256"):
        W.resolve_inception_weights()
    with pytest.raises(W.InceptionWeightsError, match="has SHA-256"):
        W.resolve_inception_weights(bad)


def test_resolution_order(hub, tmp_path, monkeypatch):
    hub.mkdir(parents=True)
    files = {}
    for name, content in (("explicit", b"a"), ("env", b"b"), ("hub", b"c")):
        p = tmp_path / f"{name}.pth" if name != "hub" else hub / W.WEIGHTS_NAMES[0]
        p.write_bytes(content)
        files[name] = p

    def trust(content: bytes):  # make one file's bytes "the right ones"
        monkeypatch.setattr(W, "WEIGHTS_SHA256", hashlib.sha256(content).hexdigest())

    trust(b"c")
    assert W.resolve_inception_weights() == files["hub"]
    monkeypatch.setenv(W.ENV_VAR, str(files["env"]))
    trust(b"b")
    assert W.resolve_inception_weights() == files["env"]
    trust(b"a")
    assert W.resolve_inception_weights(files["explicit"]) == files["explicit"]
    with pytest.raises(W.InceptionWeightsError):  # env var set to a wrong file: no silent fallback to the hub
        W.resolve_inception_weights()
    monkeypatch.setenv(W.ENV_VAR, str(tmp_path / "missing.pth"))
    with pytest.raises(W.InceptionWeightsError, match="missing.pth"):
        W.resolve_inception_weights()


def test_verified_file_loads_into_the_port_with_weights_only(hub, tmp_path, monkeypatch, random_inception):
    """A state dict file (here: the random network's) with the trusted hash loads bit-exactly; a pickle
    holding anything but tensors is refused by weights_only=True."""
    path = tmp_path / "inception.pth"
    torch.save(random_inception.state_dict(), path)
    monkeypatch.setattr(W, "WEIGHTS_SHA256", W.sha256_file(path))
    model = InceptionFeatures.from_weights(str(path))
    assert model.is_reference_network and model.weights_id == W.WEIGHTS_SHA256
    for (k, a), (_, b) in zip(model.state_dict().items(), random_inception.state_dict().items()):
        assert torch.equal(a, b), k

    evil = tmp_path / "evil.pth"
    torch.save({"x": Exploit()}, evil)
    monkeypatch.setattr(W, "WEIGHTS_SHA256", W.sha256_file(evil))
    with pytest.raises(Exception, match="[Ww]eights only"):
        W.load_inception_state_dict(evil)


class Exploit:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))
