"""Export of Edits for use outside erasekit: LoRA files loaded by stock diffusers, merged folders.

The LoRA tests load the file with diffusers' own ``load_lora_weights`` (peft backend) into a fresh
pipeline built from the same seed, never through erasekit, and compare images with the Edit
applied by erasekit. The merged tests reload the folder with stock ``from_pretrained``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import erasekit
from conftest import build_tiny
from erasekit.errors import ConfigError, EditError
from erasekit.pipelines import Edit, Sampling, generate, load_pipeline, one_step_pipeline
from erasekit.pipelines.lora import DEFAULT_RTOL, to_lora
from erasekit.pipelines.merged import MANIFEST_FILE

pytest.importorskip("peft")

SAMPLING = Sampling("ddim", 2, 7.5, batch_size=2)
PROMPTS = ["a cat in Van Gogh style", "a photo of a dog"]
SEEDS = [0, 1]


def _images(pipe, prompts=PROMPTS, seeds=SEEDS, sampling=SAMPLING) -> np.ndarray:
    return np.asarray(generate(pipe, prompts, seeds, sampling, output_type="np"))


def _params(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}/{n}": p.detach().clone() for c in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, c, None) is not None for n, p in getattr(pipe, c).named_parameters()}


def _named(pipe, comp: str, tail: str) -> str:
    """The key of ``comp``'s parameter ending in ``tail`` (transformers versions nest the text model differently)."""
    return comp + "/" + next(n for n, _ in getattr(pipe, comp).named_parameters() if n.endswith(tail))


def _hand_edit(pipe, rank: int = 2) -> Edit:
    """An Edit of every kind of LoRA-able tensor: UNet cross-attention (Linear), a 3x3 and a 1x1 conv,
    a Linear bias, and a projection in each text encoder; changes of rank ``rank``."""
    g = torch.Generator().manual_seed(0)
    keys = ["unet/down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            "unet/down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight",
            "unet/down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.bias",
            "unet/down_blocks.0.resnets.0.conv1.weight", "unet/conv_out.weight",
            _named(pipe, "text_encoder", "layers.0.self_attn.q_proj.weight")]
    if getattr(pipe, "text_encoder_2", None) is not None:
        keys.append(_named(pipe, "text_encoder_2", "layers.1.mlp.fc1.weight"))
    new = {}
    for key in keys:
        comp, name = key.split("/", 1)
        w = getattr(pipe, comp).get_parameter(name).detach()
        flat = w.reshape(w.shape[0], -1)
        if w.ndim == 1:
            change = torch.randn(w.shape, generator=g)
        else:
            change = (torch.randn(flat.shape[0], rank, generator=g) @ torch.randn(rank, flat.shape[1], generator=g))
        new[key] = w + 0.3 * flat.norm() / change.norm() * change.reshape(w.shape)
    return Edit.from_weights(pipe, new, {"method": "hand", "concepts": ["Van Gogh"]}, low_rank=False)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lora_loads_in_stock_diffusers_and_reproduces_the_edit(family, clip_tokenizer_dir, tmp_path):
    pipe = build_tiny(family, clip_tokenizer_dir)
    edit = _hand_edit(pipe)
    rec = to_lora(edit, tmp_path / "e.safetensors", pipe)
    assert rec.exact and rec.max_error < 1e-5 and set(rec.ranks.values()) == {2}
    base = _images(pipe)
    with edit.applied(pipe):
        edited = _images(pipe)
    assert np.abs(edited - base).max() > 1e-2   # the Edit changes the images, so equality below means something
    fresh = build_tiny(family, clip_tokenizer_dir)
    fresh.load_lora_weights(str(tmp_path / "e.safetensors"))
    got = _images(fresh)
    np.testing.assert_allclose(got, edited, atol=1e-5)
    # the loaded adapters cover every component the Edit changes, text encoders included
    wrapped = {c for c in ("unet", "text_encoder", "text_encoder_2") if getattr(fresh, c, None) is not None and
               any("lora_A" in n for n, _ in getattr(fresh, c).named_parameters())}
    assert wrapped == {k.split("/")[0] for k in edit.keys}


def test_closed_form_uce_exports_exactly(tiny_sd1, clip_tokenizer_dir, tmp_path):
    edit = erasekit.erase(tiny_sd1, "uce", ["Van Gogh"])
    rec = edit.to_lora(tmp_path / "uce.safetensors", tiny_sd1)
    assert rec.exact and rec.max_error < 1e-5
    assert max(rec.ranks.values()) <= edit.manifest["delta_rank_bound"]   # the rank the method proves
    with edit.applied(tiny_sd1):
        edited = _images(tiny_sd1)
    fresh = build_tiny("sd1", clip_tokenizer_dir)
    fresh.load_lora_weights(str(tmp_path / "uce.safetensors"))
    np.testing.assert_allclose(_images(fresh), edited, atol=1e-5)


def test_exact_low_rank_deltas_export_without_the_pipeline(tiny_sd1, tmp_path):
    w = tiny_sd1.unet.get_parameter("mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight")
    u, v = torch.randn(w.shape[0], 1), torch.randn(1, w.shape[1])
    edit = Edit.from_factors(tiny_sd1, {"unet/mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight": (u, v)},
                             {"method": "hand", "concepts": ["x"]})
    assert edit.deltas   # stored as factors
    rec = edit.to_lora(tmp_path / "f.safetensors")
    from safetensors.torch import load_file

    t = load_file(tmp_path / "f.safetensors")
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    assert rec.errors and rec.max_error == 0.0
    assert torch.equal(t[key + ".lora_B.weight"], u) and torch.equal(t[key + ".lora_A.weight"], v)


def test_dense_change_is_factored_to_the_requested_error_and_diffusers_loads_that(tiny_sd1, clip_tokenizer_dir,
                                                                                  tmp_path):
    edit = erasekit.erase(tiny_sd1, "esd", ["Van Gogh"], steps=2, ddim_steps=4, progress=False)
    assert edit.weights and not edit.deltas
    with pytest.raises(ConfigError, match="needs the base pipeline"):
        edit.to_lora(tmp_path / "x.safetensors")
    rtol = 0.3
    rec = edit.to_lora(tmp_path / "esd.safetensors", tiny_sd1, rtol=rtol)
    assert not rec.exact and 0 < rec.max_error <= rtol
    weights = [k for k in rec.ranks]
    assert any(rec.errors[k] > 1e-3 for k in weights)   # truncated for real at this tolerance
    meta = json.loads(__import__("safetensors").safe_open(str(tmp_path / "esd.safetensors"), "pt").metadata()
                      ["erasekit_lora"])
    assert meta["errors"] == pytest.approx(rec.errors) and meta["max_error"] == pytest.approx(rec.max_error)
    fresh = build_tiny("sd1", clip_tokenizer_dir)
    fresh.load_lora_weights(str(tmp_path / "esd.safetensors"))
    for key in weights:   # what diffusers loaded: B @ A * scaling, against the Edit's change
        layer = fresh.unet.get_submodule(key.split("/", 1)[1].rsplit(".", 1)[0])
        name = next(iter(layer.lora_A))
        b, a = layer.lora_B[name].weight.detach().flatten(1), layer.lora_A[name].weight.detach().flatten(1)
        got = b @ a * layer.scaling[name]
        change = (edit.weights[key] - tiny_sd1.unet.get_parameter(key.split("/", 1)[1]).detach()).flatten(1)
        err = float((got - change).norm() / change.norm())
        assert err == pytest.approx(rec.errors[key], abs=1e-5)
    # a smaller tolerance keeps more rank and gets closer
    tight = edit.to_lora(tmp_path / "esd2.safetensors", tiny_sd1)
    assert tight.max_error <= DEFAULT_RTOL and sum(tight.ranks.values()) > sum(rec.ranks.values())
    fixed = edit.to_lora(tmp_path / "esd3.safetensors", tiny_sd1, rank=1)
    assert set(fixed.ranks.values()) == {1} and fixed.rtol is None


def test_params_with_no_lora_form_are_refused_or_dropped_with_their_share(tiny_sd1, tmp_path):
    norm = "unet/down_blocks.0.resnets.0.norm1.weight"
    lin = "unet/down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    p = {k: tiny_sd1.unet.get_parameter(k.split("/", 1)[1]).detach() for k in (norm, lin)}
    dn, dl = torch.ones_like(p[norm]), torch.zeros_like(p[lin])
    dl[0, 0] = 3.0
    edit = Edit.from_weights(tiny_sd1, {norm: p[norm] + dn, lin: p[lin] + dl},
                             {"method": "hand", "concepts": ["x"]}, low_rank=False)
    with pytest.raises(EditError, match=r"no LoRA form.*norm1\.weight.*--merged.*drop_unsupported"):
        edit.to_lora(tmp_path / "x.safetensors", tiny_sd1)
    assert not (tmp_path / "x.safetensors").exists()
    rec = edit.to_lora(tmp_path / "x.safetensors", tiny_sd1, drop_unsupported=True)
    assert rec.dropped == [norm] and set(rec.ranks) == {lin}
    expected = float(dn.pow(2).sum() / (dn.pow(2).sum() + 9.0))
    assert rec.dropped_share == pytest.approx(expected, rel=1e-5)


def _one_step_edit(pipe) -> Edit:
    new = {"unet/conv_out.weight": pipe.unet.conv_out.weight.detach() * 1.5}
    return Edit.from_weights(pipe, new, {"method": "sfd", "concepts": ["Van Gogh"], "sampler": "one_step",
                                         "generator_timestep": 625}, low_rank=False)


def test_one_step_generator_refuses_lora_and_merges_as_a_one_step_folder(tiny_sd1, tmp_path):
    edit = _one_step_edit(tiny_sd1)
    with pytest.raises(EditError, match=r"own 'one_step' sampler.*--merged"):
        edit.to_lora(tmp_path / "x.safetensors", tiny_sd1)
    assert not (tmp_path / "x.safetensors").exists()
    before = _params(tiny_sd1)
    edit.merge(tiny_sd1, tmp_path / "sfd")
    assert all(torch.equal(before[k], v) for k, v in _params(tiny_sd1).items())   # pipe left unchanged
    fast = load_pipeline(tmp_path / "sfd")
    assert type(fast).__name__ == "OneStepPipeline" and fast.t_init == 625
    ref = _images(one_step_pipeline(tiny_sd1, edit))
    assert np.array_equal(_images(fast), ref)
    assert "one-step generator" in (tmp_path / "sfd" / "README.md").read_text()


@pytest.mark.parametrize("family", ["sd1", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_merged_folder_reloads_in_stock_diffusers_bit_identical(family, clip_tokenizer_dir, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = build_tiny(family, clip_tokenizer_dir)
    edit = _hand_edit(pipe)
    edit.manifest.update(kind="style", base_model="tiny-" + family)
    from erasekit.eval.report import Report

    report = Report(protocol={"name": "tiny"}, judge={}, targets=["Van Gogh"], method="hand",
                    scores={"UA": 87.5, "IRA": 93.75})
    (tmp_path / "report.json").write_text(report.to_json())
    before = _params(pipe)
    folder = edit.merge(pipe, tmp_path / "merged", evaluation=tmp_path / "report.json")
    assert all(torch.equal(before[k], v) for k, v in _params(pipe).items())
    with edit.applied(pipe):
        edited = _images(pipe)
    stock = DiffusionPipeline.from_pretrained(folder)
    stock.set_progress_bar_config(disable=True)
    assert np.array_equal(_images(stock), edited)
    card = (folder / "README.md").read_text()
    assert "Van Gogh erased with hand" in card and "| kind | style |" in card and "UA: 87.50" in card
    assert edit.manifest["fingerprint"]["id"] in card and "tiny-" + family in card
    saved = json.loads((folder / MANIFEST_FILE).read_text())
    assert saved["keys"] == edit.manifest["keys"] and saved["method"] == "hand"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary folder left
    with pytest.raises(ConfigError, match="already exists.*overwrite"):
        edit.merge(pipe, folder)
    edit.merge(pipe, folder, overwrite=True)


def test_merged_folder_is_recognised_as_already_edited(tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    edit = erasekit.erase(tiny_sd1, "uce", ["Van Gogh"])
    folder = edit.merge(tiny_sd1, tmp_path / "m")
    said = r"already edited by uce on Van Gogh \(merged folder .*m\b"
    loaded = load_pipeline(folder)
    for pipe in (loaded, StableDiffusionPipeline.from_pretrained(folder)):
        with pytest.raises(EditError, match=said) as err:
            edit.apply(pipe)
        assert "different base model" not in str(err.value)
    other = erasekit.erase(loaded, "uce", ["Monet"])   # erasing from it records what it carries
    assert other.manifest["base_edited_by"] == {"method": "uce", "concepts": ["Van Gogh"], "folder": str(folder)}


def test_edit_made_for_another_model_keeps_the_usual_message(tiny_sd1, tmp_path):
    edit = erasekit.erase(tiny_sd1, "uce", ["Van Gogh"])
    with torch.no_grad():
        for p in tiny_sd1.unet.parameters():
            p.mul_(1.5)
    tiny_sd1.save_pretrained(tmp_path / "other")
    with pytest.raises(EditError, match="made for a different base model"):
        edit.apply(load_pipeline(tmp_path / "other"))


def test_cli_export(tiny_sd1, tmp_path, capsys):
    from erasekit.cli.main import main

    tiny_sd1.save_pretrained(tmp_path / "base")
    _hand_edit(tiny_sd1).save(tmp_path / "esd.safetensors")   # dense new weights, as ESD's
    _one_step_edit(tiny_sd1).save(tmp_path / "sfd.safetensors")
    base = ["export", "--model", str(tmp_path / "base"), "--edit"]
    assert main(base + [str(tmp_path / "esd.safetensors"), "--lora", str(tmp_path / "l.safetensors"),
                        "--rtol", "0.2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_error"] <= 0.2 and out["rtol"] == 0.2 and (tmp_path / "l.safetensors").is_file()
    assert main(base + [str(tmp_path / "esd.safetensors"), "--merged", str(tmp_path / "m"), "-q"]) == 0
    assert (tmp_path / "m" / "README.md").is_file() and (tmp_path / "m" / MANIFEST_FILE).is_file()
    cases = [([str(tmp_path / "sfd.safetensors"), "--lora", str(tmp_path / "s.safetensors")], "--merged OUT"),
             ([str(tmp_path / "esd.safetensors"), "--merged", str(tmp_path / "m2"), "--rank", "2"], "--lora only"),
             ([str(tmp_path / "esd.safetensors"), "--lora", str(tmp_path / "x.safetensors"), "--evaluation", "r.json"],
              "use it with --merged"),
             ([str(tmp_path / "esd.safetensors"), "--merged", str(tmp_path / "m")], "already exists"),
             ([str(tmp_path / "esd.safetensors")], "one of the arguments --lora --merged is required")]
    for args, said in cases:
        assert main(base + args) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "s.safetensors").exists() and not (tmp_path / "m2").exists()


def test_canvas_judge_scores_through_the_lora_match_the_edit(canvas_pipe, canvas_judge, tmp_path):
    """UA and IRA on canvas-mini from the LoRA loaded by stock diffusers equal the Edit's within one image."""
    from erasekit.canvas.world import caption

    edit = erasekit.erase(canvas_pipe, "uce", ["Van Gogh"])
    edit.to_lora(tmp_path / "vg.safetensors", canvas_pipe)
    objects = ["Cats", "Trees", "Flowers"]
    prompts = [caption(o, s) for s in ("Van_Gogh", "Pop_Art") for o in objects]
    seeds, sampling = list(range(len(prompts))), Sampling("ddim", 10, 7.5, batch_size=6)
    vg, pop = canvas_judge.find("Van_Gogh")[1], canvas_judge.find("Pop_Art")[1]

    def hits(pipe):
        styles = canvas_judge.classify(generate(pipe, prompts, seeds, sampling))["style"]
        return int((styles[:3] == vg).sum()), int((styles[3:] == pop).sum())

    with edit.applied(canvas_pipe):
        with_edit = hits(canvas_pipe)
    # the erasure moves UA on this grid by more than the tolerance, so a LoRA that did nothing would fail
    assert hits(canvas_pipe)[0] - with_edit[0] >= 2
    fresh = load_pipeline("canvas-mini")
    fresh.load_lora_weights(str(tmp_path / "vg.safetensors"))
    with_lora = hits(fresh)
    assert abs(with_lora[0] - with_edit[0]) <= 1 and abs(with_lora[1] - with_edit[1]) <= 1


@pytest.mark.slow
def test_esd_lora_on_canvas_mini_reproduces_images_within_the_recorded_error(canvas_pipe, canvas_judge, tmp_path):
    """A dense ESD change factored at the default tolerance: the images through the LoRA differ from the
    Edit's by less than the recorded weight error, relative to how far the Edit moved them."""
    from erasekit.canvas.world import OBJECTS, caption

    edit = erasekit.erase(canvas_pipe, "esd", ["Van Gogh"], steps=40, progress=False)
    rec = edit.to_lora(tmp_path / "esd.safetensors", canvas_pipe)
    assert not rec.exact and rec.max_error <= DEFAULT_RTOL
    prompts = [caption(o, s) for s in ("Van_Gogh", "Pop_Art") for o in OBJECTS[:4]]
    seeds, sampling = list(range(len(prompts))), Sampling("ddim", 20, 7.5, batch_size=8)
    base = _images(canvas_pipe, prompts, seeds, sampling)
    with edit.applied(canvas_pipe):
        edited = _images(canvas_pipe, prompts, seeds, sampling)
    fresh = load_pipeline("canvas-mini")
    fresh.load_lora_weights(str(tmp_path / "esd.safetensors"))
    got = _images(fresh, prompts, seeds, sampling)
    assert np.linalg.norm(got - edited) <= rec.max_error * np.linalg.norm(edited - base)
    styles = [canvas_judge.classify([(x * 255).round().astype(np.uint8) for x in imgs])["style"]
              for imgs in (edited, got)]
    assert abs(int((styles[0] != styles[1]).sum())) <= 1


def test_inference_time_edit_refuses_lora_and_merges_as_its_unchanged_weights(tiny_sd1, tmp_path):
    import erasekit

    edit = erasekit.erase(tiny_sd1, "sld", ["Van Gogh"], preset="max")
    with pytest.raises(EditError, match=r"own 'sld' sampler.*--merged"):
        edit.to_lora(tmp_path / "x.safetensors", tiny_sd1)
    assert not (tmp_path / "x.safetensors").exists()
    before = _params(tiny_sd1)
    folder = edit.merge(tiny_sd1, tmp_path / "sld")
    assert all(torch.equal(before[k], v) for k, v in _params(tiny_sd1).items())
    again = load_pipeline(folder)
    assert all(torch.equal(before[k], v) for k, v in _params(again).items())   # no weights change
    card = (folder / "README.md").read_text()
    assert "sld" in card and "does **not** erase" in card
    assert json.loads((folder / MANIFEST_FILE).read_text())["sampler"] == "sld"
    # the model card's recipe samples the erasure from the folder
    from erasekit.pipelines import Edit, Sampling, generate

    sampling = Sampling(steps=3, guidance=5.0)
    rebuilt = Edit({}, {}, json.loads((folder / MANIFEST_FILE).read_text()))
    with edit.sampled(tiny_sd1) as p:
        want = generate(p, "a painting by Van Gogh", [0], sampling, output_type="pt")[0]
    with rebuilt.sampled(again) as p:
        got = generate(p, "a painting by Van Gogh", [0], sampling, output_type="pt")[0]
    plain = generate(tiny_sd1, "a painting by Van Gogh", [0], sampling, output_type="pt")[0]
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(want, plain, atol=1e-4)
