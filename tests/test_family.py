"""Per-family prompt encoding, token positions and the embedding route (tiny random pipelines)."""

import pytest
import torch

from erasekit.errors import ConfigError
from erasekit.pipelines import FamilyAdapter, cross_attention_kv, detect_family


def test_family_detected(tiny_pipe, request):
    # the fixture built this pipeline with the architecture of the family it is parametrised with
    assert detect_family(tiny_pipe) == request.node.callspec.params["tiny_pipe"]


def test_token_positions(tiny_pipe):
    ad = FamilyAdapter(tiny_pipe)
    tok = ad.tokenize(["a cat", "", "a photo of Van Gogh"])
    # BOS + words + EOS: last word = mask.sum() - 2, EOS right after it, "" -> BOS position 0
    assert tok.last_word_index.tolist() == [2, 0, 5]
    assert tok.eos_index.tolist() == [3, 1, 6]
    eos_id = ad.tokenizers[0].eos_token_id
    assert tok.input_ids[0, 3].item() == eos_id


def test_encode_shapes(tiny_pipe):
    ad = FamilyAdapter(tiny_pipe)
    ctx = ad.encode(["a cat", "a dog"])
    assert ctx.embeds.shape == (2, 77, ad.context_dim)
    assert (ctx.pooled is not None) == (ad.family == "sdxl")


def test_encode_matches_diffusers_encode_prompt(tiny_pipe):
    ad = FamilyAdapter(tiny_pipe)
    ours = ad.encode(["a cat"])
    if ad.family == "sdxl":
        ref, _, pooled, _ = tiny_pipe.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=False)
        assert torch.allclose(ours.pooled, pooled, atol=1e-6)
    else:
        ref, _ = tiny_pipe.encode_prompt("a cat", device="cpu", num_images_per_prompt=1,
                                         do_classifier_free_guidance=False)
    assert torch.allclose(ours.embeds, ref, atol=1e-6)


def test_encode_from_token_embeddings_matches_ids(tiny_pipe):
    ad = FamilyAdapter(tiny_pipe)
    prompts = ["a cat in Mosaic style", ""]
    toks = [ad.tokenize(prompts, i) for i in range(len(ad.encoders))]
    embeds = [ad.token_embedding(i)(t.input_ids) for i, t in enumerate(toks)]
    a, b = ad.encode_token_embeds(embeds, toks), ad.encode(prompts)
    assert torch.allclose(a.embeds, b.embeds, atol=1e-5)
    if b.pooled is not None:
        assert torch.allclose(a.pooled, b.pooled, atol=1e-5)


def test_too_long_prompt_refused(tiny_sd1):
    with pytest.raises(ConfigError, match="at most 77"):
        FamilyAdapter(tiny_sd1).tokenize(" ".join(["cat"] * 100))


def test_cross_attention_projections(tiny_pipe):
    kv = cross_attention_kv(tiny_pipe.unet)
    assert kv and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in kv)
    dim = FamilyAdapter(tiny_pipe).context_dim
    assert all(m.in_features == dim for m in kv.values())


def test_not_a_diffusion_pipeline():
    class Fake:
        unet = None
        text_encoder = None

    with pytest.raises(ConfigError, match="Stable Diffusion"):
        detect_family(Fake())
