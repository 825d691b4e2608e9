"""P4D: prompts optimised so that the erased model predicts the noise the original model predicts.

Chin et al., "Prompting4Debugging: Red-Teaming Text-to-Image Diffusion Models by Finding Problematic
Prompts", ICML 2024 (arXiv 2309.06135). Given a prompt P that shows the concept, its target image
x_tgt made by the ORIGINAL model theta, and the erased model theta', P4D minimises

    E_{t ~ U[0, T), eps ~ N(0, I)} || eps_theta(z_t, t, W(P)) - eps_theta'(z_t, t, W(P*_disc)) ||^2,
    z_t = sqrt(abar_t) z_tgt + sqrt(1 - abar_t) eps

over a prompt P* of free token embeddings (Eq. 3-4 of the paper). The optimisation is PEZ's
projected discrete descent: the continuous embeddings P*_cont are projected onto their nearest
vocabulary embeddings (cosine) before every forward, the loss is taken on the projection
P*_disc, and its gradient updates P*_cont (AdamW, lr 0.1, weight decay 0.1). Two ways to lay the
free tokens out (``variant``):

- ``n`` (P4D-N): N free tokens (paper: 16) make the whole prompt, initialised at random tokens;
- ``k`` (P4D-K): the prompt's own tokens stay, and one free token goes in front of every group of
  K (paper: 3) of them, ``[a, w1, w2, w3, a, w4, w5, w6, a, ...]`` (L // K + 1 free tokens for L words).

The original model's predictions come from the same pipeline with the Edit removed: for every
block of ``eval_every`` steps the timesteps and noises are drawn first, the Edit is taken off, the
block's targets are computed without gradients, and the Edit goes back on (exact, see
:meth:`~erasekit.Edit.remove`); no second copy of the model is kept. After each block the projected
prompt is decoded to text, generated with the erased model at the prompt's seed and judged; the
first hit stops the attack on that prompt.

Deviations (recorded in the result's config): success is decided online by the judge after every
block, with early stop (the reference keeps the prompt whose image is most CLIP-similar to the
target over all 3,000 steps and judges it afterwards); z_tgt is the VAE posterior mean (the
reference samples it), as UnlearnDiffAtk; prompts are optimised in batches with one random stream
per prompt, so a prompt's attack does not depend on its batch; ``vocabulary = round_trip`` (default)
projects onto whole words that decode and re-tokenise to themselves (``full``: the reference's
whole vocabulary). SDXL: one token id per slot for both text encoders, chosen by the sum of the
two cosine similarities, and the slot variable holds one embedding per encoder.

SD 3 and Flux (flow matching, :mod:`erasekit.pipelines.flow`; the paper has SD 1.4 only): the loss
compares velocities instead of noises, at the scheduler's training noise levels,

    E_{sigma, eps} || v_theta((1 - sigma) z_tgt + sigma eps, sigma, W(P)) - v_theta'(same, sigma, W(P*_disc)) ||^2,

``sigma = shift(t / T)`` with ``t ~ U{1..T}`` (the scheduler's shift, Flux's resolution-dependent one
included) and ``z_tgt`` the target image's latent as the pipeline decodes it. The free slots are CLIP
tokens (SD 3: CLIP-L and CLIP-G, one id per slot for both, as on SDXL; Flux: CLIP-L, which reaches the
transformer through the pooled vector only); their rows and the pooled vector are built from the token
embeddings exactly as ``encode_prompt`` builds them from ids. T5 has another vocabulary, so no gradient
reaches it: it reads the text of the current projection P*_disc (re-encoded whenever a prompt's
projection changes), so the conditioning of the loss is, row for row, that of the judged prompt.
W(P) is the pipeline's own encoding of P by every encoder. ``unet_evals`` counts transformer
evaluations (two per step, as on a UNet); the T5 re-encodings are text-encoder work and not counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..config import MethodConfig, check
from ..errors import ConfigError
from ..pipelines.family import FamilyAdapter, Tokens
from ..pipelines.mmdit import denoiser
from ..pipelines.prefix import VOCABULARIES, attack_vocabulary, clip_side, t5_rows
from .baselines import evaluate_original, judged_round, prompt_generator
from .result import PromptAttack
from .unlearndiffatk import flow_model, target_latents

VARIANTS = ("n", "k")


@dataclass
class P4DConfig(MethodConfig):
    """Options of P4D (defaults: the paper's and its reference configs)."""

    variant: str = field(default="k", metadata={"help": "n (P4D-N: N free tokens make the prompt) or k (P4D-K: a "
                                                        "free token in front of every K prompt tokens)"})
    n_tokens: int = field(default=16, metadata={"help": "free tokens of P4D-N (paper: 16)"})
    every_k: int = field(default=3, metadata={"help": "P4D-K: one free token per this many prompt tokens (paper: 3)"})
    steps: int = field(default=3000, metadata={"help": "maximum AdamW steps per prompt (paper: 3,000)"})
    eval_every: int = field(default=50, metadata={"help": "steps between judged generations (paper: 50)"})
    lr: float = field(default=0.1, metadata={"help": "AdamW learning rate on the continuous embeddings (paper: 0.1)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (paper: 0.1)"})
    vocabulary: str = field(default="round_trip", metadata={"help": "projection targets: round_trip (whole words "
                                                                     "that re-tokenise to themselves) or full"})
    batch_size: int = field(default=16, metadata={"help": "prompts optimised together in one UNet batch"})
    seed: int = field(default=0, metadata={"help": "seed of the initial tokens, noise and timesteps"})

    def validate(self) -> None:
        check(self.variant in VARIANTS, f"`variant` must be one of {VARIANTS} but is {self.variant!r}")
        check(isinstance(self.n_tokens, int) and 1 <= self.n_tokens <= 75,
              f"`n_tokens` must be an integer in [1, 75] but is {self.n_tokens!r}")
        check(isinstance(self.every_k, int) and self.every_k >= 1, f"`every_k` must be an integer >= 1 but is "
                                                                   f"{self.every_k!r}")
        for name in ("steps", "eval_every", "batch_size"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, f"`{name}` must be an integer >= 1 but is {v!r}")
        check(self.lr > 0, f"`lr` must be > 0 but is {self.lr}")
        check(self.weight_decay >= 0, f"`weight_decay` must be >= 0 but is {self.weight_decay}")
        check(self.vocabulary in VOCABULARIES, f"`vocabulary` must be one of {VOCABULARIES} but is {self.vocabulary!r}")

    def check_edit(self, edit) -> None:
        """P4D compares the erased model with the original one: it needs the Edit (not applied)."""
        if edit is None:
            raise ConfigError("p4d matches the erased model's noise prediction to the ORIGINAL model's, so it needs "
                              "the erasure as an Edit: pass edit=... (Python) or --edit FILE (CLI) with the original "
                              "pipeline")
        if edit.one_step:
            raise ConfigError(f"p4d matches noise predictions of a denoiser, but this Edit (method "
                              f"{edit.manifest.get('method')!r}) is a one-step generator: attack it with "
                              "unlearndiffatk or a baseline")


class SlotPrompts:
    """Prompts whose token sequence holds free slots (P4D-N or P4D-K layout), for every text encoder.

    ``layout[i]`` is prompt i's word-token sequence with -1 at its free slots; ``slots`` (B x S,
    -1 padded) are the sequence positions of the free slots (SOT is position 0). On SD 3 / Flux the
    slots are CLIP tokens: :attr:`adapter` lists the CLIP tokenizers and encoders, :attr:`full` every
    encoder, and :meth:`encode` takes the T5 rows of the prompts' text (:meth:`t5_rows`).
    """

    def __init__(self, pipe, prompts: list[str], config: P4DConfig):
        self.full = FamilyAdapter(pipe)
        self.adapter = clip_side(self.full)
        self.prompts = list(prompts)
        tok = self.adapter.tokenizers[0]
        words = [tok(p, add_special_tokens=False).input_ids for p in self.prompts]
        self.layout = [self._layout(w, config) for w in words]
        n = tok.model_max_length
        for p, lay in zip(self.prompts, self.layout):
            if len(lay) + 2 > n:
                raise ConfigError(f"prompt {p[:60]!r} needs {len(lay) + 2} of the text encoder's {n} positions with "
                                  f"p4d's free tokens: shorten the prompt, or raise every_k / lower n_tokens")
        width = max(sum(x < 0 for x in lay) for lay in self.layout)
        self.slots = torch.full((len(prompts), width), -1, dtype=torch.long)
        for i, lay in enumerate(self.layout):
            pos = [j + 1 for j, x in enumerate(lay) if x < 0]
            self.slots[i, :len(pos)] = torch.tensor(pos)
        self.mask = self.slots >= 0
        self.tokens = [self._tokens(t) for t in self.adapter.tokenizers]

    @staticmethod
    def _layout(words: list[int], config: P4DConfig) -> list[int]:
        if config.variant == "n":
            return [-1] * config.n_tokens
        k, out, rest = config.every_k, [], list(words)
        for j in range(len(words) // k + 1):   # the reference's count: L // K + 1 free tokens
            out += [-1] + rest[j * k:(j + 1) * k]
        return out

    def _tokens(self, tok) -> Tokens:
        n, dev = tok.model_max_length, self.adapter.device
        ids = torch.full((len(self.prompts), n), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, lay in enumerate(self.layout):
            seq = [tok.bos_token_id] + [tok.bos_token_id if x < 0 else x for x in lay] + [tok.eos_token_id]
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        return Tokens(ids.to(dev), mask.to(dev))

    def subset(self, rows: list[int]) -> "SlotPrompts":
        new = object.__new__(SlotPrompts)
        new.full, new.adapter, new.prompts = self.full, self.adapter, [self.prompts[r] for r in rows]
        new.layout, new.slots, new.mask = [self.layout[r] for r in rows], self.slots[rows], self.mask[rows]
        idx = torch.tensor(rows, dtype=torch.long, device=self.tokens[0].input_ids.device)
        new.tokens = [Tokens(t.input_ids[idx], t.attention_mask[idx]) for t in self.tokens]
        return new

    @property
    def mmdit(self) -> bool:
        return self.full.mmdit

    def t5_rows(self, texts: list[str]) -> torch.Tensor | None:
        """SD 3 / Flux: the T5 rows of ``texts`` as the pipeline encodes them (no gradient); None on a UNet."""
        return t5_rows(self.full, texts) if self.mmdit else None

    def encode(self, slot_embeds: list[torch.Tensor], t5: torch.Tensor | None = None):
        """The denoiser's context with ``slot_embeds`` (one B x S x D_i per CLIP encoder) in the free slots
        (SD 3 / Flux: ``t5``, the T5 rows, in T5's place)."""
        rows, cols = self.mask.nonzero(as_tuple=True)
        pos = self.slots[rows, cols]
        embeds = []
        for enc, t, s in zip(self.adapter.encoders, self.tokens, slot_embeds):
            base = enc.get_input_embeddings().weight.detach()[t.input_ids]
            s = s.to(base.dtype)
            embeds.append(base.index_put((rows.to(base.device), pos.to(base.device)), s[rows, cols]))
        return self.adapter.encode_token_embeds(embeds, self.tokens, t5)

    def texts(self, ids: torch.Tensor) -> list[str]:
        """The prompts as text with the slot token ids ``ids`` (B x S) filled in."""
        tok, out = self.adapter.tokenizers[0], []
        for lay, row, m in zip(self.layout, ids.tolist(), self.mask.tolist()):
            fill = iter(x for x, ok in zip(row, m) if ok)
            out.append(tok.decode([next(fill) if x < 0 else x for x in lay]).strip())
        return out


class _BatchP4D:
    """The optimisation state of one batch of prompts: continuous slot embeddings, AdamW, random streams."""

    def __init__(self, pipe, edit, sp: SlotPrompts, base_ctx, z0, rows: list[PromptAttack], vocab, config, fm=None):
        self.pipe, self.edit, self.sp, self.rows, self.config, self.fm = pipe, edit, sp, rows, config, fm
        self.net = denoiser(pipe)
        dev = self.net.device
        self.base_ctx, self.z0 = base_ctx, z0.to(dev)
        self.gens = [prompt_generator(config.seed, r.prompt, r.seed) for r in rows]
        self.tables = [e.get_input_embeddings().weight.detach()[vocab.to(dev)].float() for e in sp.adapter.encoders]
        self.unit = [torch.nn.functional.normalize(t, dim=-1) for t in self.tables]
        self.vocab = vocab.to(dev)
        width = sp.slots.shape[1]
        init = torch.stack([torch.randint(len(vocab), (width,), generator=g) for g in self.gens]).to(dev)
        self.p_cont = [t[init].clone().requires_grad_(True) for t in self.tables]
        self.opt = torch.optim.AdamW(self.p_cont, lr=config.lr, weight_decay=config.weight_decay)
        # DDPM: the cumulative alphas; flow matching: noise levels from the FlowModel (module docstring)
        self.abar = pipe.scheduler.alphas_cumprod.to(dev, torch.float32) if fm is None else None
        self.active = list(range(len(rows)))
        self.t5: dict[int, tuple[str, torch.Tensor]] = {}   # SD 3 / Flux: prompt -> (its text now, its T5 rows)

    def project(self) -> torch.Tensor:
        """Nearest vocabulary entry of each slot (sum of cosine similarities over the encoders): B x S indices."""
        with torch.no_grad():
            sim = sum(torch.nn.functional.normalize(p, dim=-1) @ u.T for p, u in zip(self.p_cont, self.unit))
        return sim.argmax(-1)

    def draw(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(t, eps) for ``n`` steps of the active prompts, each from the prompt's own stream (flow matching:
        the noise level sigma in place of t)."""
        out = []
        for _ in range(n):
            if self.fm is None:
                t = torch.cat([torch.randint(len(self.abar), (1,), generator=self.gens[i]) for i in self.active])
            else:
                t = torch.cat([self.fm.sample_sigmas(1, self.gens[i]) for i in self.active])
            eps = torch.cat([torch.randn(self.z0[:1].shape, generator=self.gens[i]) for i in self.active])
            out.append((t.to(self.z0.device), eps.to(self.z0.device)))
        return out

    def noised(self, t, eps) -> torch.Tensor:
        if self.fm is not None:   # flow matching: (1 - sigma) z_tgt + sigma eps
            from ..pipelines.flow import noisy

            return noisy(self.z0[self.active], eps, t)
        ab = self.abar[t].view(-1, 1, 1, 1)
        return ab.sqrt() * self.z0[self.active] + (1 - ab).sqrt() * eps

    def predict(self, t, eps, ctx) -> torch.Tensor:
        """The denoiser's prediction at the draw (t, eps) with text ``ctx``: the noise (UNet) or the velocity
        (flow matching, at sigma = t)."""
        x = self.noised(t, eps)
        if self.fm is not None:
            return self.fm.predict(self.net, x, t, ctx)
        return self.net(x.to(self.net.dtype), t, **ctx.unet_kwargs(self.pipe)).sample.float()

    def targets(self, draws) -> list[torch.Tensor]:
        """The ORIGINAL model's prediction with W(P) (eps_theta, or v_theta on a flow model): the Edit is off
        for this call only."""
        ctx = self.base_ctx[self.active]
        with self.edit.removed(self.pipe), torch.no_grad():
            return [self.predict(t, eps, ctx) for t, eps in draws]

    def t5_rows(self, idx: torch.Tensor) -> torch.Tensor | None:
        """SD 3 / Flux: the T5 rows of the active prompts' projected text (B x S vocabulary indices ``idx``),
        re-encoded only for the prompts whose text changed since the last step; None on a UNet."""
        if not self.sp.mmdit:
            return None
        texts = self.sp_active.texts(self.vocab[idx].cpu())
        stale = [(i, text) for i, text in zip(self.active, texts) if self.t5.get(i, (None,))[0] != text]
        if stale:
            rows = self.sp.t5_rows([text for _, text in stale])
            self.t5.update({i: (text, rows[j:j + 1]) for j, (i, text) in enumerate(stale)})
        return torch.cat([self.t5[i][1] for i in self.active])

    def step(self, t, eps, target) -> None:
        """One PEZ step: project, loss on the projection, its gradient to the continuous embeddings."""
        act = self.active
        idx = self.project()[act]
        p_disc = [tab[idx].requires_grad_(True) for tab in self.tables]
        ctx = self.sp_active.encode(p_disc, self.t5_rows(idx))
        pred = self.predict(t, eps, ctx)
        loss = (pred - target).pow(2).flatten(1).mean(1).sum()   # per-prompt means: prompts independent
        grads = torch.autograd.grad(loss, p_disc)
        mask = self.sp_active.mask.to(self.z0.device).unsqueeze(-1)
        for p, g in zip(self.p_cont, grads):
            full = torch.zeros_like(p)
            full[act] = g * mask
            p.grad = full
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    @property
    def sp_active(self) -> SlotPrompts:
        if getattr(self, "_sp_for", None) != self.active:
            self._sp, self._sp_for = self.sp.subset(self.active), list(self.active)
        return self._sp

    def texts_now(self) -> list[str]:
        ids = self.vocab[self.project()[self.active]].cpu()
        return self.sp_active.texts(ids)


def _run_batch(state: _BatchP4D, judge, sampling, config: P4DConfig, bar) -> None:
    done = 0
    while done < config.steps and state.active:
        n = min(config.eval_every, config.steps - done)
        t0 = time.perf_counter()
        draws = state.draw(n)
        targets = state.targets(draws)
        for (t, eps), target in zip(draws, targets):
            state.step(t, eps, target)
        done += n
        share = (time.perf_counter() - t0) / len(state.active)
        rows = [state.rows[i] for i in state.active]
        for r in rows:
            r.unet_evals += 2 * n   # the original model's forward and the erased model's
            r.grad_steps += n
            r.wall_time_s += share
            r.rounds += 1
        judged_round(state.pipe, rows, state.texts_now(), [r.seed for r in rows], judge, sampling, done)
        state.active = [i for i in state.active if not state.rows[i].success]
        bar.update(n)
        bar.set_postfix(active=len(state.active))


def p4d(pipe, prompts, seeds, concepts, *, judge, sampling, config: P4DConfig, targets, edit=None, progress=True,
        **_) -> list[PromptAttack]:
    """Attack every prompt (module docstring); ``edit``: the erasure, applied to ``pipe`` while this runs."""
    config.check_edit(edit)
    sp = SlotPrompts(pipe, prompts, config)
    vocab = attack_vocabulary(sp.adapter.tokenizers, config.vocabulary)
    fm = flow_model(pipe, sampling)
    z0 = target_latents(pipe, targets, fm)
    rows = evaluate_original(pipe, prompts, seeds, judge, concepts, sampling, max(config.batch_size, 64))
    todo = [r.index for r in rows if not r.success]
    if not todo:
        return rows
    with edit.removed(pipe):   # W(P) of the original text encoders: the target side of the loss
        base_ctx = sp.full.encode([prompts[i] for i in todo])
    at = {idx: j for j, idx in enumerate(todo)}
    batches = [todo[i:i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
    bar = tqdm(total=config.steps * len(todo), desc="p4d steps", disable=not progress, leave=False)
    for part in batches:
        state = _BatchP4D(pipe, edit, sp.subset(part), base_ctx[[at[i] for i in part]], z0[part],
                          [rows[i] for i in part], vocab, config, fm)
        _run_batch(state, judge, sampling, config, bar)
    bar.close()
    return rows
