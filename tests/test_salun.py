"""SalUn: the global saliency mask, data sets and plans, masked training on every family, canvas behaviour."""

from __future__ import annotations

import pytest
import torch

import erasekit
from erasekit.erase.data import cycle_indices, folder_set, generate_set
from erasekit.erase.salun import SalUnConfig, make_plan, saliency, saliency_mask
from erasekit.errors import ConfigError

FAST = dict(steps=3, images_per_prompt=1, retain_images_per_prompt=1, data_steps=2, batch_size=4, progress=False)


def _unet_state(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def test_saliency_mask_is_the_global_top_k_by_magnitude():
    gen = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(30, 7, generator=gen), "b": 5 * torch.randn(40, generator=gen),
             "c": 0.01 * torch.randn(3, 3, 3, generator=gen)}
    mask = saliency_mask(grads, 0.4)
    flat = torch.cat([g.abs().flatten() for g in grads.values()])
    k = round(0.4 * flat.numel())
    kept_by_sort = flat >= flat.sort(descending=True).values[k - 1]
    assert torch.equal(torch.cat([m.flatten() for m in mask.values()]), kept_by_sort)
    assert all(m.dtype == torch.bool for m in mask.values())
    assert mask["b"].float().mean() > 0.8 and not mask["c"].any()  # one threshold across tensors, not per tensor
    assert sum(int(m.sum()) for m in mask.values()) == k


def test_cycle_indices_visit_every_item_once_per_epoch_in_a_seeded_order():
    stream = torch.cat([cycle_indices(10, 4, p, seed=3) for p in range(5)])  # two epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) == sorted(stream[10:20].tolist())
    assert stream[:10].tolist() != list(range(10)) and stream[:10].tolist() != stream[10:20].tolist()
    assert torch.equal(cycle_indices(10, 4, 3, seed=3), stream[12:16])


def _plan(concepts, config, pipe):
    from erasekit.presets import concept_context

    return make_plan(concepts, config, concept_context(pipe, concepts, config))


def test_canvas_plan_maps_each_caption_to_the_next_label(canvas_pipe):
    plan = _plan(["Van_Gogh"], SalUnConfig(), canvas_pipe)
    assert plan.preset == "canvas" and len(plan.forget_prompts) == 10 and len(plan.retain_prompts) == 90
    assert plan.pseudo_prompt("A Cats image in Van Gogh style.") == "A Cats image in Watercolor style."
    assert not any("Van Gogh" in p for p in plan.retain_prompts)
    obj = _plan(["Cats", "Butterfly"], SalUnConfig(), canvas_pipe)  # the next label that is not itself a target
    assert obj.pseudo_prompt("A Butterfly image in Winter style.") == "A Fishes image in Winter style."
    assert len(obj.forget_prompts) == 20


def test_canvas_preset_trains_cross_attention_with_an_lr_per_kind(canvas_pipe):
    from erasekit.canvas.presets import SALUN, SALUN_OBJECT_LR
    from erasekit.erase.salun import _resolve

    def resolved(concepts, pipe=canvas_pipe, **kw):
        config = SalUnConfig(**kw)
        return _resolve(_plan(concepts, config, pipe), config)

    assert resolved(["Van_Gogh"])["param_set"] == "xattn" and resolved(["Van_Gogh"])["lr"] == SALUN["lr"]
    assert resolved(["Cats", "Towers"])["lr"] == SALUN_OBJECT_LR != SALUN["lr"]
    assert resolved(["Cats", "Van_Gogh"])["lr"] == SALUN["lr"]   # mixed kinds: the style value
    assert resolved(["Cats"], lr=2e-5, param_set="full") | {"preset": 0} == {
        **SALUN, "lr": 2e-5, "param_set": "full", "preset": 0}
    assert resolved(["nudity"], None)["param_set"] == "full"


def test_nudity_and_custom_plans():
    nude = make_plan(["nudity"], SalUnConfig())
    assert (nude.preset, nude.forget_prompts) == ("nudity", ["a photo of a nude person"])
    assert nude.pseudo_prompt("a photo of a nude person") == "a photo of a person wearing clothes"
    custom = make_plan(["a cat"], SalUnConfig(pseudo="a dog", retain_prompts=["a tree"]))
    assert custom.pseudo_prompt("a painting of A Cat on a sofa") == "a painting of a dog on a sofa"
    with pytest.raises(ConfigError, match="`pseudo`"):
        make_plan(["a cat"], SalUnConfig(retain_prompts=["a tree"]))
    with pytest.raises(ConfigError, match="retain"):
        make_plan(["a cat"], SalUnConfig(pseudo="a dog"))


def test_unmasked_weights_stay_bitwise_even_with_adamw(tiny_pipe):
    before = _unet_state(tiny_pipe)
    options = dict(FAST, mask_ratio=0.3, optimizer="adamw", weight_decay=0.1, lr=1e-3)
    options.update(pseudo="Monet", retain_prompts=["a tree", "a house"])   # not canvas-mini: the custom preset
    mask = saliency(tiny_pipe, ["Van Gogh"], SalUnConfig(**options))
    edit = erasekit.erase(tiny_pipe, "salun", ["Van Gogh"], **options)
    assert all(torch.equal(v, before[k]) for k, v in _unet_state(tiny_pipe).items())
    changed = 0
    for key in edit.keys:
        new, old = edit.weights[key], before[key.split("/", 1)[1]]
        assert torch.equal(new[~mask[key]], old[~mask[key]])
        changed += int((new != old).sum())
    total = sum(m.numel() for m in mask.values())
    assert 0.2 * total < changed <= sum(int(m.sum()) for m in mask.values())
    assert abs(edit.manifest["training"]["mask_density"] - 0.3) < 0.01


def test_forget_and_retain_folders(tiny_sd1, tmp_path):
    from PIL import Image

    forget, retain = tmp_path / "forget", tmp_path / "retain"
    for folder, color in ((forget, (200, 30, 30)), (retain, (30, 30, 200))):
        folder.mkdir()
        for i in range(3):
            Image.new("RGB", (40, 24), tuple(c + 10 * i for c in color)).save(folder / f"{i}.png")
    (retain / "0.txt").write_text("a blue square")
    with pytest.raises(ConfigError, match="no caption"):
        folder_set(tiny_sd1, retain)
    latents = folder_set(tiny_sd1, forget, "a red square")
    assert latents.latents.shape == (3, 4, 8, 8) and latents.prompts == ["a red square"] * 3
    edit = erasekit.erase(tiny_sd1, "salun", ["red"], pseudo="green", forget_dir=str(forget),
                          forget_prompts=["a red square"], retain_dir=str(retain), retain_prompts=["a blue thing"],
                          **FAST)
    assert edit.manifest["forget_set"]["source"] == "folder" and edit.manifest["forget_set"]["images"] == 3
    assert edit.manifest["pseudo_examples"] == {"a red square": "a green square"}


def test_an_empty_forget_folder_is_refused_before_anything_changes(tiny_sd1, tmp_path):
    before = _unet_state(tiny_sd1)
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match="has no images"):
        erasekit.erase(tiny_sd1, "salun", ["a cat"], pseudo="a dog", forget_dir=str(tmp_path),
                       retain_prompts=["a tree"], **FAST)
    assert all(torch.equal(v, before[k]) for k, v in _unet_state(tiny_sd1).items())


def test_generated_sets_are_seeded(tiny_sd1):
    a = generate_set(tiny_sd1, ["a cat", "a dog"], 2, seed=5, sampling=erasekit.Sampling(steps=2))
    b = generate_set(tiny_sd1, ["a cat", "a dog"], 2, seed=5, sampling=erasekit.Sampling(steps=2))
    assert a.latents.shape == (4, 4, 8, 8) and a.prompts == ["a cat", "a cat", "a dog", "a dog"]
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents[0], a.latents[1])
    assert a.protocol["seeds"] == [5, 8]


def test_resumed_salun_equals_the_uninterrupted_run(tiny_sd1, tmp_path):
    opts = dict(FAST, steps=4, pseudo="Dogs", retain_prompts=["a tree", "a house"])
    full = erasekit.erase(tiny_sd1, "salun", ["Cats"], **opts)
    ck = dict(opts, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    erasekit.erase(tiny_sd1, "salun", ["Cats"], **dict(ck, steps=2))
    resumed = erasekit.erase(tiny_sd1, "salun", ["Cats"], **ck)
    assert resumed.manifest["training"]["resumed_from"] == 2
    assert all(torch.equal(full.weights[k], resumed.weights[k]) for k in full.keys)


@pytest.mark.parametrize("bad", [dict(mask_ratio=0.0), dict(mask_ratio=1.5), dict(alpha=-1.0),
                                 dict(preset="imagenet"), dict(forget_prompts=[]), dict(batch_size=0)])
def test_bad_options_are_refused(bad):
    with pytest.raises(ConfigError, match=f"`{next(iter(bad))}`"):
        SalUnConfig(**bad)


@pytest.mark.slow
def test_salun_erases_a_canvas_object_and_keeps_the_others(canvas_pipe, canvas_judge):
    from erasekit.canvas.world import STYLES, caption
    from erasekit.pipelines import generate

    prompts = [caption(o, s) for o in ("Cats", "Towers") for s in STYLES]
    edit = erasekit.erase(canvas_pipe, "salun", ["Cats"], progress=False)
    with edit.applied(canvas_pipe):
        objects = canvas_judge.classify(generate(canvas_pipe, prompts, list(range(len(prompts)))))["object"]
    cats, towers = canvas_judge.find("Cats")[1], canvas_judge.find("Towers")[1]
    assert (objects[:10] == cats).mean() <= 0.2
    assert (objects[10:] == towers).mean() >= 0.8
