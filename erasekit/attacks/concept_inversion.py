"""Concept inversion: a new token learned on the ERASED model from images that show the concept.

Pham et al., "Circumventing Concept Erasure Methods for Text-to-Image Generative Models", ICLR 2024
(arXiv 2308.01508). Textual inversion (Gal et al. 2023) run on the erased model: one new token
embedding v* per concept minimises the denoising loss on images of the concept,

    v* = argmin_v E_{x, t ~ U[0, T), eps ~ N(0, I)} || eps - eps_theta'(z_t, t, tau(y(v))) ||^2,

with theta' the erased model, z_t the noised VAE latent of a target image x and y(v) a caption that
holds the token. Only v is trained; every weight stays frozen. If the erasure only cut the path
from the concept's WORDS to the concept, a new word finds another path, and prompts with it show
the concept again: the paper's evidence that post-hoc erasures are shallow.

Here the target images are the attacked prompts' own images from the original model (as
UnlearnDiffAtk's), one token is learned per concept from all of that concept's prompts, and each
caption y(v) is the attacked prompt with the concept's name replaced by the token (the token goes
in front of a prompt that does not name the concept). These captions are also the adversarial
prompts: every ``eval_every`` steps the still-unbroken prompts are generated with the current
embedding at their seeds and judged; a concept stops training once all its prompts are broken.

Defaults follow the reference's training script (its ``train.sh`` for every erasure): AdamW, base
lr 5e-3 scaled by the 16 images of a step (batch 4 x 4 accumulation, ``scale_lr``), constant
schedule, weight decay 1e-2, at most 5,000 steps, initialiser word ``art`` (its style setting).

The learned embeddings are part of the result (``AttackResult.embeddings``, saved as
``<result>.embeddings.safetensors`` next to it). The token of a judged round is named
``<concept-step>`` (e.g. ``<van_gogh-250>``), so each row's ``adv_prompt`` names the exact embedding
its image was made with. Reuse them on any pipeline of the same base model with
:func:`learned_tokens` (a context manager that restores the pipeline) or diffusers'
``pipe.load_textual_inversion({token: vector}, token=token)`` (SD 1.x/2.x; permanent).

Deviations (recorded in the result's config): captions are the attacked prompts rather than the
reference's templates ("a painting in the style of {}"), so the training captions and the evaluated
prompts are the same text; success is judged online with early stop (the reference trains all
steps and generates afterwards); z_tgt is the VAE posterior mean (the reference samples it). The
pipeline's tokenizers and embedding tables are swapped for extended copies only while a token is
needed and restored afterwards, also on error.

SD 3 and Flux (flow matching, :mod:`erasekit.pipelines.flow`; the paper has SD 1.4 only): the loss is the
model's training loss, ``|| v_theta'((1 - sigma) z + sigma eps, sigma, tau(y(v))) - (eps - z) ||^2`` with
``sigma = shift(t / T)``, ``t ~ U{1..T}`` (the scheduler's training grid and shift). The token is added to
EVERY text encoder the pipeline's ``encode_prompt`` reads, each with its own learned vector (SD 3: CLIP-L,
CLIP-G and T5, keys ``token``, ``token::text_encoder_2``, ``token::text_encoder_3``; Flux: CLIP-L and T5,
``token``, ``token::text_encoder_2``), as diffusers' Flux pivotal-tuning script does with ``--enable_t5_ti``:
T5 carries most of the text on these models (on Flux CLIP-L reaches the transformer only through the pooled
vector), so a token in the CLIP encoders alone would miss it. T5 is run from its token embeddings (the
pipeline calls it on ids without an attention mask and looks ids up unscaled, so the rows are the
pipeline's); SD 3 loaded without T5 learns CLIP-L and CLIP-G only (its T5 rows are zeros). Each distinct
caption is encoded once per step. ``unet_evals`` counts transformer evaluations (one per image).
"""

from __future__ import annotations

import copy
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..config import MethodConfig, check
from ..errors import ConfigError
from ..pipelines.family import Context, FamilyAdapter
from ..pipelines.locking import pipeline_lock
from ..pipelines.mmdit import denoiser
from ..pipelines.prefix import clip_side
from .baselines import evaluate_original, judged_round, prompt_generator
from .concepts import words
from .result import PromptAttack
from .unlearndiffatk import flow_model, target_latents

_PAIRS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"))
SECOND = "::text_encoder_2"
"""Key suffix of a token's vector for the second text encoder in ``AttackResult.embeddings`` (SDXL: OpenCLIP-G;
SD 3: CLIP-G; Flux: T5)."""
THIRD = "::text_encoder_3"
"""Key suffix of a token's vector for the third text encoder (SD 3: T5)."""
_SUFFIX = ("", SECOND, THIRD)


@dataclass
class ConceptInversionConfig(MethodConfig):
    """Options of concept inversion (defaults: the reference's textual-inversion training)."""

    steps: int = field(default=5000, metadata={"help": "maximum AdamW steps per concept (reference: 5,000)"})
    eval_every: int = field(default=250, metadata={"help": "steps between judged generations of the unbroken "
                                                           "prompts (the reference judges once, after training)"})
    lr: float = field(default=5e-3, metadata={"help": "base learning rate (reference: 5e-3)"})
    scale_lr: bool = field(default=True, metadata={"help": "multiply lr by images_per_step (the reference's "
                                                           "--scale_lr: 5e-3 x 16 = 0.08)"})
    images_per_step: int = field(default=16, metadata={"help": "target images per concept and step (reference: "
                                                               "batch 4 x 4 accumulation)"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay (reference: 1e-2)"})
    initializer: str = field(default="art", metadata={"help": "word whose embedding starts the token (reference: "
                                                              "'art' for styles; mean of its tokens)"})
    seed: int = field(default=0, metadata={"help": "seed of image draws, noise and timesteps"})

    def validate(self) -> None:
        for name in ("steps", "eval_every", "images_per_step"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                  f"`{name}` must be an integer >= 1 but is {v!r}")
        check(self.lr > 0, f"`lr` must be > 0 but is {self.lr}")
        check(self.weight_decay >= 0, f"`weight_decay` must be >= 0 but is {self.weight_decay}")
        check(isinstance(self.initializer, str) and self.initializer.strip() != "",
              f"`initializer` must be a non-empty word but is {self.initializer!r}")

    @property
    def effective_lr(self) -> float:
        return self.lr * (self.images_per_step if self.scale_lr else 1)


# -- tokens in a pipeline ---------------------------------------------------------------------------
def _pairs(pipe) -> list[tuple[str, str]]:
    return list(_PAIRS[:len(FamilyAdapter(pipe).encoders)])


@contextmanager
def learned_tokens(pipe, embeddings: dict[str, torch.Tensor]):
    """``with learned_tokens(pipe, emb): pipe("a cats image in <van_gogh-250> style")``.

    Adds each token of ``embeddings`` (``{token: vector}`` for the first text encoder; with two or three
    encoders also ``{token + SECOND: vector}`` and ``{token + THIRD: vector}``: SDXL's OpenCLIP-G, SD 3's
    CLIP-G and T5, Flux's T5) to copies of the pipeline's tokenizers and embedding tables, puts
    the copies in the pipeline for the block and restores the originals after it (also on error).
    A new token's row follows the tokenizer's vocabulary (T5's table has spare rows past it, which the
    copy's new rows overwrite). Yields ``{token: id}`` in the first tokenizer. Holds the pipeline's lock.
    """
    tokens = [k for k in embeddings if not k.endswith(_SUFFIX[1:])]
    with pipeline_lock(pipe):
        saved, first = [], None
        try:
            for which, (tname, ename) in enumerate(_pairs(pipe)):
                tok, enc = getattr(pipe, tname), getattr(pipe, ename)
                old = enc.get_input_embeddings()
                clash = [t for t in tokens if t in tok.get_vocab()]
                if clash:
                    raise ConfigError(f"the tokenizer already has the token {clash[0]!r}: use a pipeline without "
                                      "it (e.g. one that has not loaded that textual inversion)")
                new_tok = copy.deepcopy(tok)
                new_tok.add_tokens(tokens)
                ids = new_tok.convert_tokens_to_ids(tokens)
                if len(tok) > old.num_embeddings or ids != list(range(len(tok), len(tok) + len(tokens))):
                    raise ConfigError(f"the tokenizer ({len(tok)} tokens) does not match its text encoder's embedding "
                                      f"table ({old.num_embeddings} rows): learned tokens cannot be added")
                rows = torch.stack([embeddings[t + _SUFFIX[which]] for t in tokens]).to(old.weight)
                weight = old.weight.detach()
                weight = torch.cat([weight, weight.new_zeros(max(0, ids[-1] + 1 - len(weight)), weight.shape[1])])
                weight[ids] = rows
                saved.append((tname, tok, enc, old))
                setattr(pipe, tname, new_tok)
                enc.set_input_embeddings(torch.nn.Embedding.from_pretrained(weight, freeze=True))
                first = first or dict(zip(tokens, ids))
            yield first
        finally:
            for tname, tok, enc, old in reversed(saved):
                setattr(pipe, tname, tok)
                enc.set_input_embeddings(old)


def token_name(concept: str, step: int | None = None) -> str:
    """``<van_gogh>`` / ``<van_gogh-250>``: the learned token of ``concept`` (at ``step``)."""
    slug = "_".join(words(concept).split()) or "concept"
    return f"<{slug}>" if step is None else f"<{slug}-{step}>"


def with_token(prompt: str, concept: str, token: str) -> str:
    """``prompt`` with every mention of ``concept`` (any case, ``_`` or spaces between its words)
    replaced by ``token``; ``token`` in front when the prompt does not name the concept."""
    parts = words(concept).split()
    pattern = r"(?<![^\W_])" + r"[\W_]+".join(map(re.escape, parts)) + r"(?![^\W_])"
    out, n = re.subn(pattern, lambda _: token, prompt, flags=re.IGNORECASE) if parts else (prompt, 0)
    return out if n else f"{token} {prompt}".strip()


# -- the attack ------------------------------------------------------------------------------------
class _Inversion:
    """Learned vectors of every concept (one row per concept and encoder) and their training captions."""

    def __init__(self, pipe, rows: list[PromptAttack], z0, config: ConceptInversionConfig, fm=None):
        self.pipe, self.rows, self.config, self.z0, self.fm = pipe, rows, config, z0, fm
        self.adapter = FamilyAdapter(pipe)
        self.concepts = list(dict.fromkeys(r.concept for r in rows))
        self.of = [self.concepts.index(r.concept) for r in rows]
        self.placeholders = [token_name(c) for c in self.concepts]
        self.texts = [with_token(r.prompt, r.concept, self.placeholders[c]) for r, c in zip(rows, self.of)]
        dev = denoiser(pipe).device
        self.v = [self._init(enc, tok).expand(len(self.concepts), -1).clone().requires_grad_(True)
                  for enc, tok in zip(self.adapter.encoders, self.adapter.tokenizers)]
        self.opt = torch.optim.AdamW(self.v, lr=config.effective_lr, weight_decay=config.weight_decay)
        with learned_tokens(pipe, self.embeddings(self.placeholders)):
            adapter = FamilyAdapter(pipe)
            self.tokens = [adapter.tokenize(self.texts, which=i) for i in range(len(adapter.encoders))]
            own = [torch.tensor(tok.convert_tokens_to_ids([self.placeholders[c] for c in self.of]),
                                device=dev).unsqueeze(1) for tok in adapter.tokenizers]
        self.slot = [t.input_ids == o for t, o in zip(self.tokens, own)]   # rows x length: where the token sits
        self.gens = [prompt_generator(config.seed, c, 0) for c in self.concepts]
        self.abar = pipe.scheduler.alphas_cumprod.to(dev, torch.float32) if fm is None else None
        self.active = list(range(len(self.concepts)))
        if self.adapter.mmdit:   # which encoders are CLIP (read from token embeddings) and which one is T5
            self.clip = [i for i, e in enumerate(self.adapter.encoders) if type(e).__name__.startswith("CLIPTextModel")]
            self.t5 = next((i for i in range(len(self.adapter.encoders)) if i not in self.clip), None)
            self.t5_zeros = None if self.t5 is not None else \
                FamilyAdapter(pipe).encode(self.texts[:1]).embeds[:, 77:]   # SD 3 without T5: zero rows

    def _init(self, enc, tok) -> torch.Tensor:
        ids = tok(self.config.initializer, add_special_tokens=False).input_ids
        return enc.get_input_embeddings().weight.detach()[ids].float().mean(0, keepdim=True)

    def embeddings(self, names: list[str], which: list[int] | None = None) -> dict[str, torch.Tensor]:
        """``{token: vector}`` (more encoders: plus ``token + SECOND``, ``token + THIRD``) of concepts ``which``
        (default all) under ``names``."""
        which = range(len(self.concepts)) if which is None else which
        out = {}
        for name, c in zip(names, which):
            for e, v in enumerate(self.v):
                out[name + _SUFFIX[e]] = v[c].detach().cpu().clone()
        return out

    def unbroken(self, c: int) -> list[int]:
        return [i for i, r in enumerate(self.rows) if self.of[i] == c and not r.success]

    def encode_mmdit(self, embeds: list[torch.Tensor], toks: list) -> Context:
        """SD 3 / Flux: the transformer's text from token embeddings of every encoder (differentiable): the CLIP
        encoders as ``encode_prompt`` runs them, T5 from its token embeddings (the pipeline calls it on ids
        without an attention mask, and T5 looks its ids up unscaled, so this equals the pipeline's rows)."""
        if self.t5 is not None:
            enc = self.adapter.encoders[self.t5]
            t5 = enc(inputs_embeds=embeds[self.t5])[0].to(enc.dtype)
        else:
            t5 = self.t5_zeros.expand(len(toks[0].input_ids), -1, -1)
        return clip_side(self.adapter).encode_token_embeds([embeds[i] for i in self.clip],
                                                           [toks[i] for i in self.clip], t5)

    def step(self) -> dict[int, int]:
        """One AdamW step on every active concept; returns the images each concept used."""
        if self.fm is not None:
            return self.flow_step()
        n, unet, dev = self.config.images_per_step, self.pipe.unet, self.z0.device
        pick, used = self._draw()
        t = torch.cat([torch.randint(len(self.abar), (n,), generator=self.gens[c]) for c in self.active]).to(dev)
        eps = torch.cat([torch.randn((n, *self.z0.shape[1:]), generator=self.gens[c]) for c in self.active]).to(dev)
        ab = self.abar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * self.z0[pick] + (1 - ab).sqrt() * eps
        concept = torch.tensor([self.of[i] for i in pick], device=dev)
        embeds = []
        for enc, tok, slot, v in zip(self.adapter.encoders, self.tokens, self.slot, self.v):
            base = enc.get_input_embeddings().weight.detach()
            ids = tok.input_ids[pick].clamp_max(base.shape[0] - 1)   # placeholder ids are past the table
            slot = slot[pick].unsqueeze(-1)
            embeds.append(torch.where(slot, v[concept].unsqueeze(1).to(base.dtype), base[ids]))
        toks = [type(t)(t.input_ids[pick], t.attention_mask[pick]) for t in self.tokens]
        ctx = self.adapter.encode_token_embeds(embeds, toks)
        pred = unet(x_t.to(unet.dtype), t, **ctx.unet_kwargs(self.pipe)).sample.float()
        loss = (pred - eps).pow(2).flatten(1).mean(1).view(len(self.active), n).mean(1).sum()  # per-concept means
        self.update(loss)
        return used

    def _draw(self) -> tuple[list[int], dict[int, int]]:
        """``images_per_step`` rows of each active concept's own images, drawn from its generator, and the
        count each concept used."""
        n = self.config.images_per_step
        pick, used = [], {}
        for c in self.active:
            own = [i for i in range(len(self.rows)) if self.of[i] == c]
            draw = torch.randint(len(own), (n,), generator=self.gens[c])
            pick += [own[j] for j in draw.tolist()]
            used[c] = n
        return pick, used

    def update(self, loss: torch.Tensor) -> None:
        """One AdamW step of the active concepts' vectors on ``loss``."""
        for v, g in zip(self.v, torch.autograd.grad(loss, self.v)):   # only the tokens: no .grad on the model
            v.grad = g
        done = torch.ones(len(self.concepts), dtype=torch.bool)
        done[self.active] = False
        before = [v.detach()[done.to(v.device)].clone() for v in self.v]
        self.opt.step()
        with torch.no_grad():   # a finished concept keeps its vector (AdamW's decay and momentum would move it)
            for v, b in zip(self.v, before):
                v[done.to(v.device)] = b
        self.opt.zero_grad(set_to_none=True)

    def flow_step(self) -> dict[int, int]:
        """:meth:`step` on SD 3 / Flux: the flow-matching loss ``|| v(x_sigma, y(v*)) - (eps - z) ||^2`` at the
        scheduler's training noise levels; each distinct caption is encoded once per step."""
        from ..pipelines.flow import noisy, velocity

        n, dev = self.config.images_per_step, self.z0.device
        pick, used = self._draw()
        sigma = torch.cat([self.fm.sample_sigmas(n, self.gens[c]) for c in self.active]).to(dev)
        eps = torch.cat([torch.randn((n, *self.z0.shape[1:]), generator=self.gens[c]) for c in self.active]).to(dev)
        captions, at = torch.unique(torch.tensor(pick), return_inverse=True)
        captions = captions.tolist()
        concept = torch.tensor([self.of[i] for i in captions], device=dev)
        embeds = []
        for enc, tok, slot, v in zip(self.adapter.encoders, self.tokens, self.slot, self.v):
            base = enc.get_input_embeddings().weight.detach()
            ids = tok.input_ids[captions].clamp_max(base.shape[0] - 1)   # placeholder ids may be past the table
            embeds.append(torch.where(slot[captions].unsqueeze(-1), v[concept].unsqueeze(1).to(base.dtype), base[ids]))
        toks = [type(t)(t.input_ids[captions], t.attention_mask[captions]) for t in self.tokens]
        ctx = self.encode_mmdit(embeds, toks)[at.to(dev)]
        z = self.z0[pick]
        pred = self.fm.predict(self.fm.transformer, noisy(z, eps, sigma), sigma, ctx)
        err = (pred - velocity(z, eps)).pow(2).flatten(1).mean(1)
        self.update(err.view(len(self.active), n).mean(1).sum())   # per-concept means
        return used


def _book(rows: list[PromptAttack], forwards: int, backwards: int, seconds: float) -> None:
    """Share a concept's training cost among the prompts it serves (remainders to the first ones)."""
    k = len(rows)
    for j, r in enumerate(rows):
        r.unet_evals += forwards // k + (j < forwards % k)
        r.grad_steps += backwards // k + (j < backwards % k)
        r.wall_time_s += seconds / k


def concept_inversion(pipe, prompts, seeds, concepts, *, judge, sampling, config: ConceptInversionConfig, targets,
                      progress=True, **_):
    """Attack every prompt (module docstring); returns the rows and the learned embeddings."""
    rows = evaluate_original(pipe, prompts, seeds, judge, concepts, sampling, 64)
    if all(r.success for r in rows):
        return rows, {}
    fm = flow_model(pipe, sampling)
    inv = _Inversion(pipe, rows, target_latents(pipe, targets, fm).to(denoiser(pipe).device), config, fm)
    inv.active = [c for c in range(len(inv.concepts)) if inv.unbroken(c)]
    embeddings, done = {}, 0
    bar = tqdm(total=config.steps, desc="concept inversion steps", disable=not progress, leave=False)
    while done < config.steps and inv.active:
        n = min(config.eval_every, config.steps - done)
        t0, used = time.perf_counter(), {}
        for _ in range(n):
            for c, k in inv.step().items():
                used[c] = used.get(c, 0) + k
        done += n
        share = (time.perf_counter() - t0) / max(sum(used.values()), 1)
        for c, k in used.items():
            _book([rows[i] for i in inv.unbroken(c)], k, k, share * k)
        _judge(pipe, inv, judge, sampling, done, embeddings)
        inv.active = [c for c in inv.active if inv.unbroken(c)]
        bar.update(n)
    bar.close()
    return rows, embeddings


def _judge(pipe, inv: _Inversion, judge, sampling, step: int, embeddings: dict) -> None:
    """Generate the unbroken prompts of the active concepts with this step's tokens and judge them."""
    names = [token_name(inv.concepts[c], step) for c in inv.active]
    snapshot = inv.embeddings(names, inv.active)
    embeddings.update(snapshot)
    todo = [i for c in inv.active for i in inv.unbroken(c)]
    by_concept = dict(zip(inv.active, names))
    texts = [with_token(inv.rows[i].prompt, inv.rows[i].concept, by_concept[inv.of[i]]) for i in todo]
    with learned_tokens(pipe, snapshot):
        judged_round(pipe, [inv.rows[i] for i in todo], texts, [inv.rows[i].seed for i in todo], judge, sampling,
                     step)
    for i in todo:
        inv.rows[i].rounds += 1
