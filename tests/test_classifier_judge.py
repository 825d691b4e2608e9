"""A user's classifiers as a judge (timm with safetensors weights, transformers from a folder), and
the protocol presets' recorded settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from erasekit.errors import ConfigError


def _images(n=3):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


def test_timm_classifier_with_a_label_map_loads_strictly(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from erasekit.eval.judges import ClassifierJudge

    torch.manual_seed(0)
    arch = "resnet10t"
    model = timm.create_model(arch, pretrained=False, num_classes=3)
    save_file(model.state_dict(), str(tmp_path / "style.safetensors"))
    labels = {0: "Cubism", 1: "Mosaic", 2: "Van_Gogh"}
    judge = ClassifierJudge.from_timm({"style": (arch, tmp_path / "style.safetensors", labels)}, image_size=32)
    model.eval()
    preds = judge.classify(_images())["style"]
    x = torch.stack([torch.from_numpy(np.array(im.resize((32, 32), Image.BILINEAR))).permute(2, 0, 1)
                     for im in _images()]).float().div(255).sub(0.5).div(0.5)
    with torch.no_grad():
        assert preds.tolist() == model(x).argmax(-1).tolist()
    assert judge.find("van gogh") == ("style", 2)
    save_file(timm.create_model(arch, num_classes=4).state_dict(), str(tmp_path / "four.safetensors"))
    with pytest.raises(RuntimeError):  # strict: a 4-class checkpoint does not fit a 3-label map
        ClassifierJudge.from_timm({"style": (arch, tmp_path / "four.safetensors", labels)})


def test_pickled_checkpoints_are_refused_with_the_conversion_command(tmp_path):
    from erasekit.eval.judges import ClassifierJudge

    (tmp_path / "style50.pth").write_bytes(b"not opened")
    with pytest.raises(ConfigError, match="never unpickles.*safetensors"):
        ClassifierJudge.unlearncanvas(tmp_path / "style50.pth", tmp_path / "style50_cls.pth")


def test_transformers_classifier_takes_labels_from_its_config(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    from erasekit.eval.judges import ClassifierJudge

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, id2label={0: "Cats", 1: "Trees"}, label2id={"Cats": 0, "Trees": 1})
    ViTForImageClassification(cfg).save_pretrained(tmp_path / "obj")
    judge = ClassifierJudge.from_transformers({"object": tmp_path / "obj"}, image_size=32)
    assert judge.heads == {"object": ["Cats", "Trees"]}
    assert judge.classify(_images())["object"].shape == (3,)


def test_protocol_presets_record_their_settings():
    from erasekit.eval.protocol import get_protocol

    uc = get_protocol("unlearncanvas")
    assert len(uc) == 5100 and len(uc.themes) == 51 and len(uc.objects) == 20
    s = uc.sampling
    assert (s.sampler, s.steps, s.guidance, s.height, uc.seeds) == ("ddim", 100, 9.0, 512, (188, 288, 588, 688, 888))
    photo = [it.prompt for it in uc.items() if it.theme == uc.themes.index("Seed_Images")][0]
    assert photo == "A Architectures image in Photo style."
    lite, full = get_protocol("canvas-lite"), get_protocol("canvas")
    assert len(lite) == 100 and len(full) == 500
    pairs = lambda p: {(it.prompt, it.seed) for it in p.items()}  # noqa: E731
    assert pairs(lite) <= pairs(full)  # the seed-188 slice: the same images
    assert get_protocol("canvas").to_dict()["seeding"].startswith("one CPU torch.Generator")
    with pytest.raises(ConfigError, match="photo_theme"):
        lite.with_(photo_theme="Seed_Images")
