"""UCE on MMDiT transformers (SD 3 / 3.5, Flux): the closed form on the maps that read the text first.

In a UNet every cross-attention ``to_k`` / ``to_v`` reads the text encoder's output ``c`` directly,
so one least-squares problem per projection is exact for all of them (closed_form.py). An MMDiT
reads the text differently (docs/backbones.md):

    h_0 = E c + b_E                      context_embedder (one linear map, encoder rows -> text stream)
    k_i = K_i LN_i(h_i),  v_i = V_i LN_i(h_i)   block i's attn.add_k_proj / add_v_proj
    h_{i+1} = f_i(h_i, image tokens, t)   the block's update of the text stream

Only ``E`` sees ``c`` itself: ``LN_i(h_i)`` depends on the timestep's modulation and, through the
joint attention, on the image tokens. So the exact closed form is the one on ``E``: UCE's objective
(closed_form.py, eq. 7 with a ridge) with ``W = E`` and the same rows,

    min_E  s_e sum ||E c_i - E_ref g_i||^2 + s_p sum ||E c_j - E_ref c_j||^2 + lam ||E - E_ref||_F^2,

whose solution ``E = E_ref (I + P Q)`` is :class:`~erasekit.erase.closed_form.UCEFitter`'s (the bias
``b_E`` is on both sides of every residual and cancels). Every row of the concept then enters the
text stream as its guide's row does, to the least-squares residual, and so do all later inputs of
``add_k_proj`` / ``add_v_proj`` for those rows: the per-block projections are not edited, their
inputs change with ``E``. The pooled text vector reaches every block's modulation through
``time_text_embed.text_embedder.linear_1`` (a linear map of the pooled vector), which is edited by
the same closed form with one row per prompt (``edit_pooled``), exact for that map too.
"""

from __future__ import annotations

import torch

from .closed_form import SOLVE_DTYPES, RightUpdate, UCEFitter

CONTEXT = "transformer/context_embedder.weight"
POOLED = "transformer/time_text_embed.text_embedder.linear_1.weight"


def _weight(pipe, key: str) -> torch.Tensor:
    return pipe.transformer.get_parameter(key.split("/", 1)[1]).detach()


def pooled_fitter(enc, s) -> UCEFitter:
    """UCE's normal equations for the pooled-text projection: each concept prompt's pooled vector is
    mapped to its guide prompt's, each preserve prompt's is kept."""
    from .uce import preserve_prompts, prompt_pairs

    prompts, guides = prompt_pairs(s)
    keys = enc.pooled(prompts)
    fitter = UCEFitter(keys.shape[1], s.lamb, SOLVE_DTYPES[s.solve_dtype])
    fitter.update(keys, enc.pooled(guides), s.erase_scale)
    if s.preserve and s.preserve_scale > 0:
        fitter.update(enc.pooled(preserve_prompts(s)), scale=s.preserve_scale)
    return fitter


def mmdit_factors(pipe, enc, s, update: RightUpdate, edit_pooled: bool) -> dict:
    """Exact factors ``{key: (U, V)}`` of the MMDiT edit: the context embedder with ``update`` (the
    sequence rows' solution), and with ``edit_pooled`` the pooled projection with its own solution."""
    factors = {CONTEXT: update.factors(_weight(pipe, CONTEXT))}
    if edit_pooled:
        factors[POOLED] = pooled_fitter(enc, s).solve().factors(_weight(pipe, POOLED))
    return factors


def closed_form_edit(pipe, enc, s, update: RightUpdate, manifest: dict, edit_pooled: bool = True):
    """The Edit of a closed-form solution ``update`` of the text rows: every cross-attention to_k / to_v
    of a UNet, or on SD 3 / Flux the context embedder (and with ``edit_pooled`` the pooled projection)."""
    from ..pipelines import Edit
    from .closed_form import build_edit, kv_weights

    if not enc.adapter.mmdit:
        return build_edit(pipe, kv_weights(pipe), update, manifest)
    manifest = {**manifest, "mmdit_maps": "context_embedder" + ("+pooled" if edit_pooled else "")}
    return Edit.from_factors(pipe, mmdit_factors(pipe, enc, s, update, edit_pooled), manifest)


# -- the per-block variant (an approximation; docs/backbones.md) -------------------------------------
_ROW_KEYS = ("hidden_states", "timestep", "guidance")   # per-row inputs of a transformer call besides the text


def trajectory_calls(pipe, prompt: str, steps: int, seed: int = 0) -> list[dict]:
    """The transformer's keyword arguments at each of ``steps`` steps of the pipeline's own sampling of
    ``prompt`` (its default guidance, native size, ``seed``), reduced to the conditional row."""
    calls = []

    def grab(module, args, kwargs):
        rows = kwargs["hidden_states"].shape[0]
        calls.append({k: v[rows - 1:] if k in _ROW_KEYS and torch.is_tensor(v) and v.ndim else v
                      for k, v in kwargs.items() if k not in ("encoder_hidden_states", "pooled_projections")})

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe(prompt, num_inference_steps=steps, output_type="latent", generator=torch.Generator("cpu").manual_seed(seed))
    finally:
        handle.remove()
    return calls


def stream_inputs(pipe, call: dict, embeds: torch.Tensor, pooled: torch.Tensor, blocks: list[str]) -> list[torch.Tensor]:
    """Per block of ``blocks``, the input of its ``attn.add_k_proj`` (= ``add_v_proj``'s: the block's normalised,
    modulated text stream) when the transformer runs ``call`` with each prompt's text (N x S x width, float64)."""
    n, seen = embeds.shape[0], {}
    kw = {k: v.expand(n, *v.shape[1:]) if k in _ROW_KEYS and torch.is_tensor(v) and v.ndim else v
          for k, v in call.items()}
    handles = [pipe.transformer.get_submodule(f"{b}.attn.add_k_proj").register_forward_pre_hook(
        lambda m, args, b=b: seen.__setitem__(b, args[0].detach().double().cpu())) for b in blocks]
    try:
        pipe.transformer(**{**kw, "encoder_hidden_states": embeds, "pooled_projections": pooled, "return_dict": False})
    finally:
        for h in handles:
            h.remove()
    return [seen[b] for b in blocks]


def blocks_factors(pipe, enc, s, record_steps: int) -> dict:
    """Exact factors of the per-block least squares: for each joint block, UCE's objective on its
    ``add_k_proj`` / ``add_v_proj`` with the key rows recorded on the original model (approximation:
    the edits of earlier blocks change later blocks' inputs, and the rows depend on the recorded
    trajectory). Scales are divided by ``record_steps`` so that ``lam`` weighs as in one pass of rows."""
    from ..pipelines.mmdit import text_projections
    from .uce import preserve_prompts, prompt_pairs

    blocks = [n[:-len(".attn.add_k_proj")] for n in text_projections(pipe.transformer) if n.endswith("add_k_proj")]
    width = pipe.transformer.get_submodule(f"{blocks[0]}.attn.add_k_proj").in_features
    fitters = [UCEFitter(width, s.lamb, SOLVE_DTYPES[s.solve_dtype]) for _ in blocks]
    prompts, guides = prompt_pairs(s)
    keep = preserve_prompts(s) if s.preserve and s.preserve_scale > 0 else []
    ctx_c, ctx_g = enc.adapter.encode(prompts), enc.adapter.encode(guides)
    a, b = enc.last_rows(prompts), enc.last_rows(guides)
    ctx_p = enc.adapter.encode(keep) if keep else None
    last_p = enc.last_rows(keep) if keep else None
    scale = 1.0 / record_steps
    with torch.no_grad():
        for k, prompt in enumerate(prompts):
            for call in trajectory_calls(pipe, prompt, record_steps):
                X_c = stream_inputs(pipe, call, ctx_c.embeds[k:k + 1], ctx_c.pooled[k:k + 1], blocks)
                X_g = stream_inputs(pipe, call, ctx_g.embeds[k:k + 1], ctx_g.pooled[k:k + 1], blocks)
                X_p = stream_inputs(pipe, call, ctx_p.embeds, ctx_p.pooled, blocks) if keep else [None] * len(blocks)
                for fitter, c, g, p in zip(fitters, X_c, X_g, X_p):
                    fitter.update(*enc.pair(s.token_policy, c, g, a[k:k + 1], b[k:k + 1]), s.erase_scale * scale)
                    if p is not None:
                        rows = p[torch.arange(len(keep))[:, None], last_p].flatten(0, 1) \
                            if s.token_policy == "last_word" else p.flatten(0, 1)
                        fitter.update(rows, scale=s.preserve_scale * scale)
    factors = {}
    for block, fitter in zip(blocks, fitters):
        update = fitter.solve()
        for proj in ("add_k_proj", "add_v_proj"):
            key = f"transformer/{block}.attn.{proj}.weight"
            factors[key] = update.factors(_weight(pipe, key))
    return factors


def blocks_edit(pipe, enc, s, manifest: dict, edit_pooled: bool, record_steps: int):
    """The Edit of the per-block variant (:func:`blocks_factors`), with ``edit_pooled`` the pooled projection too."""
    from ..pipelines import Edit
    from .uce import check_tokens

    check_tokens(enc.adapter, s.concepts)
    factors = blocks_factors(pipe, enc, s, record_steps)
    if edit_pooled:
        factors[POOLED] = pooled_fitter(enc, s).solve().factors(_weight(pipe, POOLED))
    recorded = {"trajectory": "the pipeline's own sampling of each concept prompt (default guidance, native size, "
                              "seed 0), conditional row", "record_steps": record_steps}
    maps = "blocks" + ("+pooled" if edit_pooled else "")
    return Edit.from_factors(pipe, factors, {**manifest, "mmdit_maps": maps, "recorded": recorded})
