"""SD 3 and Flux (MMDiT) on tiny random pipelines: family, text encoding, flow-matching sampling, Edit, UCE, CLI."""

from __future__ import annotations

import pytest
import torch

import erasekit
from erasekit.errors import ConfigError
from erasekit.pipelines import Edit, FamilyAdapter, Sampling, default_sampling, detect_family, generate
from erasekit.pipelines.mmdit import text_projections

SMALL = dict(steps=2, height=16, width=16, batch_size=4)


def _family(request) -> str:
    return request.node.callspec.params["tiny_mmdit"]


def test_family_detection(tiny_mmdit, request, tiny_sd1):
    family = _family(request)
    assert detect_family(tiny_mmdit) == family
    ad = FamilyAdapter(tiny_mmdit)
    assert ad.mmdit and ad.family == family
    assert ad.context_dim == tiny_mmdit.transformer.config.joint_attention_dim
    assert not FamilyAdapter(tiny_sd1).mmdit and detect_family(tiny_sd1) == "sd1"


def test_encode_is_what_the_pipeline_feeds_the_transformer(tiny_mmdit, request):
    """The adapter's context is, row for row, what the pipeline's own denoising loop gives the transformer."""
    family, ad = _family(request), FamilyAdapter(tiny_mmdit)
    seq = ad.max_sequence_length + (77 if family == "sd3" else 0)
    ctx = ad.encode(["a cat", "Van Gogh"])
    assert ctx.embeds.shape == (2, seq, ad.context_dim)
    assert ctx.pooled.shape == (2, tiny_mmdit.transformer.config.pooled_projection_dim)
    assert sum(s.length for s in ad.segments) == seq
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("ehs", kwargs["encoder_hidden_states"].detach().clone())
        seen.setdefault("pooled", kwargs["pooled_projections"].detach().clone())

    handle = tiny_mmdit.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        tiny_mmdit("Van Gogh", num_inference_steps=1, guidance_scale=1.0, height=16, width=16, output_type="latent",
                   generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    single = ad.encode("Van Gogh")   # a batch of one, as the pipeline encodes it: bit for bit
    torch.testing.assert_close(seen["ehs"], single.embeds, rtol=0, atol=0)
    torch.testing.assert_close(seen["pooled"], single.pooled, rtol=0, atol=0)
    torch.testing.assert_close(ctx.embeds[1:], single.embeds)   # batched: the same to float32 round-off
    assert not torch.allclose(ctx.embeds[0], ctx.embeds[1])


@torch.no_grad()
def test_sd3_without_t5_encodes_zero_t5_rows_and_erases_on_its_clip_rows(clip_tokenizer_dir):
    from conftest import build_tiny_mmdit

    pipe = build_tiny_mmdit("sd3", clip_tokenizer_dir)
    pipe.text_encoder_3 = pipe.tokenizer_3 = None   # SD 3 loaded without T5 (text_encoder_3=None)
    ad = FamilyAdapter(pipe)
    assert detect_family(pipe) == "sd3" and [s.which for s in ad.segments] == [0]
    ctx = ad.encode(["Van Gogh"])
    assert ctx.embeds.shape[1] == 77 + ad.max_sequence_length and not ctx.embeds[0, 77:].any()
    edit = erasekit.erase(pipe, "uce", ["Van Gogh"])
    assert "transformer/context_embedder.weight" in edit.keys


def test_tokens_and_positions(tiny_mmdit, request):
    ad = FamilyAdapter(tiny_mmdit)
    t5 = len(ad.tokenizers) - 1
    clip, t5_tokens = ad.tokenize(["a cat", ""]), ad.tokenize(["a cat", ""], which=t5)
    assert clip.input_ids.shape == (2, 77) and t5_tokens.input_ids.shape == (2, ad.max_sequence_length)
    assert clip.last_word_index.tolist() == [2, 0]   # BOS a cat EOS; BOS EOS
    n = int(t5_tokens.attention_mask[0].sum())       # T5: pieces of "a cat", then </s>, no BOS
    assert t5_tokens.input_ids[0, n - 1].item() == ad.tokenizers[t5].eos_token_id
    assert t5_tokens.last_word_index.tolist() == [n - 2, 0]
    with pytest.raises(ConfigError, match="tokens"):
        ad.tokenize(["word " * ad.max_sequence_length], which=t5)
    with pytest.raises(ConfigError, match="t5_rows"):
        ad.encode_token_embeds([], [])


def test_text_projections_are_the_embedder_and_every_joint_blocks_add_kv(tiny_mmdit):
    found = text_projections(tiny_mmdit.transformer)
    blocks = len(tiny_mmdit.transformer.transformer_blocks)
    assert list(found)[0] == "context_embedder" and len(found) == 1 + 2 * blocks
    assert {n.rsplit(".", 1)[-1] for n in found if n != "context_embedder"} == {"add_k_proj", "add_v_proj"}


def test_seeded_generation_is_reproducible_with_the_flow_sampler(tiny_mmdit):
    sampling = default_sampling(tiny_mmdit, **SMALL)
    assert sampling.sampler == "flow_euler"
    a = generate(tiny_mmdit, ["a cat", "a cat", "Van Gogh"], [0, 1, 0], sampling, output_type="np")
    b = generate(tiny_mmdit, ["a cat", "a cat", "Van Gogh"], [0, 1, 0], sampling, output_type="np")
    assert all((x == y).all() for x, y in zip(a, b))
    assert a[0].shape == (16, 16, 3) and not (a[0] == a[1]).all()
    assert type(tiny_mmdit.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"   # put back after sampling


def test_a_ddpm_sampler_on_a_flow_model_and_the_reverse_are_config_errors(tiny_mmdit, tiny_sd1):
    with pytest.raises(ConfigError, match="flow_euler"):
        generate(tiny_mmdit, "a cat", 0, Sampling("ddim", **SMALL))
    with pytest.raises(ConfigError, match="ddim"):
        generate(tiny_sd1, "a cat", 0, Sampling("flow_euler", steps=2))


def test_sd3_default_generation_uses_its_flow_scheduler(clip_tokenizer_dir):
    from conftest import build_tiny_mmdit

    pipe = build_tiny_mmdit("sd3", clip_tokenizer_dir)   # native size 16 x 16: no size needed
    a = generate(pipe, "a cat", 3, output_type="np")[0]
    b = generate(pipe, "a cat", 3, Sampling("flow_euler"), output_type="np")[0]
    assert (a == b).all()


@pytest.fixture(scope="module")
def saved_mmdit(tmp_path_factory, clip_tokenizer_dir):
    from conftest import build_tiny_mmdit

    root = tmp_path_factory.mktemp("mmdit")
    for family in ("sd3", "flux"):
        build_tiny_mmdit(family, clip_tokenizer_dir).save_pretrained(root / family)
    return root


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_load_pipeline_reads_a_saved_folder(saved_mmdit, clip_tokenizer_dir, family):
    from conftest import build_tiny_mmdit

    pipe = erasekit.load_pipeline(saved_mmdit / family)
    assert detect_family(pipe) == family
    made = generate(build_tiny_mmdit(family, clip_tokenizer_dir), "a cat", 5, default_sampling(pipe, **SMALL),
                    output_type="np")
    loaded = generate(pipe, "a cat", 5, default_sampling(pipe, **SMALL), output_type="np")[0]
    assert abs(loaded - made[0]).max() < 1e-5   # the same weights (float32 round-off of the loaded layout aside)


def _rows(pipe, prompts, key):
    """The context embedder's (or pooled projection's) outputs for ``prompts``' rows, and those rows."""
    ctx = FamilyAdapter(pipe).encode(prompts)
    if key == "pooled":
        return pipe.transformer.time_text_embed.text_embedder.linear_1(ctx.pooled), ctx
    return pipe.transformer.context_embedder(ctx.embeds), ctx


@torch.no_grad()
def test_uce_moves_the_concept_to_its_guide_and_keeps_a_preserved_prompt(tiny_mmdit):
    """On the last-word rows the solve is nearly exact: the concept's context-embedder outputs land on the
    guide's, the preserved prompt's stay; the pooled projection does the same for the pooled vectors."""
    concept, guide, keep = "Van Gogh", "a painting", "a photo of a dog"
    edit = erasekit.erase(tiny_mmdit, "uce", [concept], guide=guide, preserve=[keep], token_policy="last_word",
                          preserve_scale=1.0, templates=["{}"])
    assert set(edit.keys) == {"transformer/context_embedder.weight",
                              "transformer/time_text_embed.text_embedder.linear_1.weight"}
    from erasekit.erase.uce import PromptEncoder

    enc = PromptEncoder(FamilyAdapter(tiny_mmdit))
    last = enc.last_rows([concept, guide, keep])            # 3 x segments
    before, _ = _rows(tiny_mmdit, [concept, guide, keep], "seq")
    pooled_before, _ = _rows(tiny_mmdit, [concept, guide, keep], "pooled")
    with edit.applied(tiny_mmdit):
        after, _ = _rows(tiny_mmdit, [concept, guide, keep], "seq")
        pooled_after, _ = _rows(tiny_mmdit, [concept, guide, keep], "pooled")
    c_old, g_old, p_old = (before[k, last[k]] for k in range(3))
    c_new, p_new = after[0, last[0]], after[2, last[2]]
    gap = (c_old - g_old).norm()
    assert (c_new - g_old).norm() < 0.25 * gap               # the concept now reads as its guide
    assert (p_new - p_old).norm() < 0.1 * gap                 # the preserved prompt does not move
    pooled_gap = (pooled_before[0] - pooled_before[1]).norm()
    assert (pooled_after[0] - pooled_before[1]).norm() < 0.25 * pooled_gap
    assert (pooled_after[2] - pooled_before[2]).norm() < 0.1 * pooled_gap


def test_uce_edit_round_trip_on_the_transformer(tiny_mmdit, tmp_path):
    before = {k: v.clone() for k, v in tiny_mmdit.transformer.state_dict().items()}
    edit = erasekit.erase(tiny_mmdit, "uce", ["Van Gogh"], edit_pooled=False)
    assert edit.keys == ["transformer/context_embedder.weight"]
    assert edit.manifest["family"] == detect_family(tiny_mmdit)
    loaded = Edit.load(edit.save(tmp_path / "uce.safetensors"), tiny_mmdit)
    loaded.apply(tiny_mmdit)
    assert not torch.equal(tiny_mmdit.transformer.context_embedder.weight, before["context_embedder.weight"])
    loaded.remove(tiny_mmdit)
    assert all(torch.equal(v, before[k]) for k, v in tiny_mmdit.transformer.state_dict().items())


def test_other_methods_refuse_mmdit_naming_the_supported_families(clip_tokenizer_dir):
    from conftest import build_tiny_mmdit

    from erasekit.erase import registry

    pipe = build_tiny_mmdit("flux", clip_tokenizer_dir)
    for method in registry.methods():
        supported = registry.supported_families(method)
        if "flux" in supported:
            continue
        with pytest.raises(ConfigError, match=rf"supports {', '.join(supported)} pipelines, but this one is flux"):
            erasekit.erase(pipe, method, ["Van Gogh"])


def test_cli_erase_uce_on_a_saved_sd3_folder(saved_mmdit, tmp_path, capsys):
    from erasekit.cli.main import EXIT_OK, main

    out = tmp_path / "vg.safetensors"
    code = main(["erase", "--model", str(saved_mmdit / "sd3"), "--method", "uce", "--concept", "Van Gogh",
                 "--out", str(out)])
    assert code == EXIT_OK, capsys.readouterr().err
    pipe = erasekit.load_pipeline(saved_mmdit / "sd3")
    edit = Edit.load(out, pipe)
    assert edit.manifest["method"] == "uce" and edit.manifest["family"] == "sd3"
    assert "transformer/context_embedder.weight" in edit.keys
    with edit.applied(pipe):
        assert generate(pipe, "Van Gogh", 0, default_sampling(pipe, **SMALL), output_type="np")[0].std() > 0


@torch.no_grad()
def test_rece_edits_the_context_embedder_and_moves_the_concept_to_its_guide(tiny_mmdit):
    """RECE's default (guide "", one epoch) on all rows: the concept's context-embedder outputs come much
    closer to the empty prompt's, row for row."""
    edit = erasekit.erase(tiny_mmdit, "rece", ["Van Gogh"])
    assert edit.keys == ["transformer/context_embedder.weight",
                         "transformer/time_text_embed.text_embedder.linear_1.weight"]
    assert edit.manifest["best_epoch"] == 1
    before, _ = _rows(tiny_mmdit, ["Van Gogh", ""], "seq")
    with edit.applied(tiny_mmdit):
        after, _ = _rows(tiny_mmdit, ["Van Gogh"], "seq")
    assert (after[0] - before[1]).norm() < 0.6 * (before[0] - before[1]).norm()


@torch.no_grad()
def test_uce_blocks_fits_every_joint_blocks_text_projections_on_the_recorded_stream(tiny_mmdit):
    """mmdit_maps="blocks": at the first joint block, whose input no edit changes, the recorded concept row
    is projected where the guide's row was, and the preserved prompt's row stays."""
    from erasekit.erase.uce import PromptEncoder
    from erasekit.erase.uce_mmdit import stream_inputs, trajectory_calls

    concept, guide, keep = "Van Gogh", "a painting", "a photo of a dog"
    edit = erasekit.erase(tiny_mmdit, "uce", [concept], guide=guide, preserve=[keep], token_policy="last_word",
                          preserve_scale=1.0, templates=["{}"], mmdit_maps="blocks", record_steps=2,
                          edit_pooled=False)
    projections = [n for n in text_projections(tiny_mmdit.transformer) if n != "context_embedder"]
    assert edit.keys == sorted(f"transformer/{n}.weight" for n in projections)
    assert edit.manifest["mmdit_maps"] == "blocks" and edit.manifest["recorded"]["record_steps"] == 2
    block = "transformer_blocks.0"
    ad = FamilyAdapter(tiny_mmdit)
    ctx, last = ad.encode([concept, guide, keep]), PromptEncoder(ad).last_rows([concept, guide, keep])
    call = trajectory_calls(tiny_mmdit, concept, 2)[0]
    rows = stream_inputs(tiny_mmdit, call, ctx.embeds, ctx.pooled, [block])[0].float()
    x = [rows[k, last[k]] for k in range(3)]    # last-word rows of concept, guide, preserved prompt
    proj = tiny_mmdit.transformer.get_submodule(f"{block}.attn.add_k_proj")
    old = [proj(v) for v in x]
    with edit.applied(tiny_mmdit):
        new = [proj(v) for v in x]
    gap = (old[0] - old[1]).norm()
    assert (new[0] - old[1]).norm() < 0.3 * gap
    assert (new[2] - old[2]).norm() < 0.15 * gap
