"""The classifier that travels with a run: packed on the driver (nothing when λ = 0), unpacked on a worker into
the same classifier."""

from __future__ import annotations

import torch

from xswinir.config import load_config
from xswinir.texture import TextureClassifier, save_texture_classifier
from xswinir.texture.payload import classifier_from_payload, classifier_payload


def test_the_unpacked_classifier_is_the_packed_one(tmp_path):
    torch.manual_seed(0)
    clf = TextureClassifier(patch_size=8, scales=(1, 2))
    with torch.no_grad():
        for p in clf.parameters():
            p.copy_(torch.randn_like(p))
    folder = save_texture_classifier(clf, tmp_path / "clf")
    cfg = load_config("demo", ["loss.texture_weight=0.1", "texture.patch_size=8", "texture.classifier.scales=[1,2]",
                               f"texture.classifier.path={folder}"])
    payload = classifier_payload(cfg)
    assert payload.path == folder and set(payload.files) == {f.name for f in folder.iterdir()}
    unpacked, local = classifier_from_payload(payload.files, torch.device("cpu"))
    assert local != folder and sorted(f.name for f in local.iterdir()) == sorted(payload.files)
    for key, value in clf.state_dict().items():
        torch.testing.assert_close(unpacked.state_dict()[key], value, atol=0, rtol=0, msg=key)


def test_no_texture_term_no_classifier(tmp_path):
    cfg = load_config("demo", ["loss.texture_weight=0", f"texture.classifier.path={tmp_path / 'none'}"])
    assert classifier_payload(cfg) is None
    assert classifier_from_payload(None, torch.device("cpu")) == (None, None)
