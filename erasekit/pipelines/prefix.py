"""Prefix-token prompts: k adversarial token slots right after the start token (``prefix_k``).

UnlearnDiffAtk (unlearndiffatk.md section 2) and AdvUnlearn's inner attack (advunlearn.md section 4)
both insert k adversarial tokens right after SOT and keep the sequence 77 long by dropping k
trailing pad positions::

    [SOT, adv_1 .. adv_k, prompt tokens, EOT, pad ...]      (segments 1, k, L + 1, 76 - L - k)

:class:`PrefixPrompts` is the one implementation of that splice. The slots can be filled with

- token ids (a discrete prompt): :meth:`PrefixPrompts.embed_ids`,
- a (relaxed or sampled) one-hot over a vocabulary, ``B x k x V``: :meth:`PrefixPrompts.embed_onehot`
  (UnlearnDiffAtk's variable),
- free continuous embeddings ``B x k x D`` per encoder (AdvUnlearn's ``word_embd`` variable),

and :meth:`PrefixPrompts.encode` turns the filled slots into the :class:`~erasekit.pipelines.Context`
the UNet reads, differentiably (position embeddings are added inside the encoder). SDXL gets the
slots in both text encoders (same token ids; each encoder's own embedding table).

SD 3 and Flux: the slots go into every CLIP encoder (SD 3: CLIP-L and CLIP-G; Flux: CLIP-L), whose
outputs are built from the token embeddings as ``encode_prompt`` builds them from ids (SD 3: penultimate
hidden states and pooled projections; Flux: the pooled output). T5 has another vocabulary and
tokenisation, so a CLIP token (or a relaxed one-hot over CLIP's vocabulary) has no T5 counterpart: T5
reads the plain prompt (its rows are encoded once, without the prefix). The adversarial text that is
judged is generated with the prefix in every encoder, T5 included, so on these families the optimised
conditioning and the judged one differ in the T5 rows (an approximation; the CLIP rows and the pooled
vector are exact). :attr:`PrefixPrompts.adapter` lists the CLIP tokenizers and encoders only.

Example (AdvUnlearn-style continuous slots)::

    pp = PrefixPrompts(pipe, ["nudity"], k=1)
    delta = pp.embed_ids(pp.random_ids(torch.Generator().manual_seed(0)))   # list, one per encoder
    delta = [d.detach().requires_grad_() for d in delta]
    ctx = pp.encode(delta)                          # Context, gradients flow to delta
    eps = pipe.unet(x_t, t, **ctx.unet_kwargs(pipe)).sample
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from ..errors import ConfigError
from .family import Context, FamilyAdapter, Tokens

VOCABULARIES = ("round_trip", "full")
_VOCAB_CACHE: dict[tuple, torch.Tensor] = {}


def attack_vocabulary(tokenizers: Sequence, mode: str = "round_trip") -> torch.Tensor:
    """Token ids an attack may put in a slot (sorted 1-D LongTensor).

    ``full``: every id but the special tokens (the reference's 49,406 choices). ``round_trip``:
    only whole-word tokens (ending in ``</w>``) whose decoded text re-tokenises to exactly that id
    under every tokenizer (about 34k of CLIP's ids), so a prompt decoded from chosen ids
    re-tokenises to the same ids and the optimised prompt is the evaluated prompt.
    """
    if mode not in VOCABULARIES:
        raise ConfigError(f"`vocabulary` must be one of {VOCABULARIES} but is {mode!r}")
    sets = [set(_vocabulary(tok, mode).tolist()) for tok in tokenizers]
    return torch.tensor(sorted(set.intersection(*sets)), dtype=torch.long)


def _vocabulary(tok, mode: str) -> torch.Tensor:
    special = set(tok.all_special_ids)
    key = (mode, type(tok).__name__, getattr(tok, "name_or_path", ""), len(tok))
    if key not in _VOCAB_CACHE:  # the round-trip check takes seconds: once per tokenizer
        ids = list(range(len(tok)))
        if mode == "round_trip":
            names = tok.convert_ids_to_tokens(ids)
            ids = [i for i, n in zip(ids, names) if n.endswith("</w>")]
            texts = [tok.decode([i]).strip() for i in ids]
            enc = tok(texts, add_special_tokens=False).input_ids
            ids = [i for i, e in zip(ids, enc) if e == [i]]
        _VOCAB_CACHE[key] = torch.tensor(ids, dtype=torch.long)
    ids = _VOCAB_CACHE[key]
    return ids[~torch.isin(ids, torch.tensor(sorted(special), dtype=torch.long))]


class PrefixPrompts:
    """A batch of prompts with ``k`` token slots right after SOT, for every text encoder of a pipeline.

    Args:
        pipe: a Stable Diffusion pipeline (SD 1.x, SD 2.x, SDXL, SD 3, Flux) or a :class:`FamilyAdapter`.
        prompts: the prompts to prefix.
        k: number of slots (1 <= k <= 75 - longest prompt's token count).

    Prompts that do not fit once the prefix is added are refused (never truncated): the error names
    the prompt, its length and the fix.
    """

    def __init__(self, pipe, prompts: Sequence[str], k: int):
        adapter = pipe if isinstance(pipe, FamilyAdapter) else FamilyAdapter(pipe)
        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"`k` must be an integer >= 1 but is {k!r}")
        self.k = k
        self.t5_rows = None
        if adapter.mmdit:   # the CLIP encoders carry the slots; T5 reads the plain prompts (module docstring)
            self.t5_rows = t5_rows(adapter, self.prompts)
        self.adapter = clip_side(adapter)
        self.base: list[Tokens] = [self.adapter.tokenize(self.prompts, which=i)
                                   for i in range(len(self.adapter.encoders))]
        self._check_fit()
        self.tokens: list[Tokens] = [self._splice_tokens(t, i) for i, t in enumerate(self.base)]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def n_encoders(self) -> int:
        return len(self.adapter.encoders)

    def _check_fit(self) -> None:
        for i, tok in enumerate(self.adapter.tokenizers):
            n = tok.model_max_length
            free = n - 1 - self.base[i].eos_index   # positions after EOS: the pads that can be dropped
            worst = int(free.argmin())
            if int(free[worst]) < self.k:
                used = int(self.base[i].eos_index[worst]) - 1
                raise ConfigError(
                    f"prompt {self.prompts[worst][:60]!r} has {used} tokens; with k={self.k} prefix tokens it "
                    f"needs {used + self.k + 2} of the text encoder's {n} positions (it leaves {int(free[worst])} "
                    f"free). Prompts are refused, not truncated: shorten the prompt or lower k")

    def _splice_tokens(self, t: Tokens, which: int) -> Tokens:
        k, n = self.k, t.input_ids.shape[1]
        pad = self.adapter.tokenizers[which].pad_token_id
        slot_ids = torch.full((len(self), k), pad, dtype=t.input_ids.dtype, device=t.input_ids.device)
        ones = torch.ones_like(slot_ids, dtype=t.attention_mask.dtype)
        return Tokens(torch.cat([t.input_ids[:, :1], slot_ids, t.input_ids[:, 1:n - k]], 1),
                      torch.cat([t.attention_mask[:, :1], ones, t.attention_mask[:, 1:n - k]], 1))

    # -- filling the slots ----------------------------------------------------------------------
    def embedding_tables(self, encoders: Sequence | None = None) -> list[torch.Tensor]:
        """Each encoder's token-embedding weight (|V| x D_i), detached."""
        encoders = encoders or self.adapter.encoders
        return [enc.get_input_embeddings().weight.detach() for enc in encoders]

    def embed_ids(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Slot embeddings (one ``B x k x D_i`` per encoder) of token ids ``B x k``."""
        self._check_slots(ids, ids.shape)
        return [table[ids.to(table.device)] for table in self.embedding_tables()]

    def embed_onehot(self, onehot: torch.Tensor, vocab: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Slot embeddings of a (relaxed) one-hot ``B x k x V`` over ``vocab`` (all ids if None).

        Differentiable in ``onehot``: each slot is ``onehot @ E[vocab]`` (unlearndiffatk.md section 3).
        """
        self._check_slots(onehot, onehot.shape[:2])
        out = []
        for table in self.embedding_tables():
            sub = table if vocab is None else table[vocab.to(table.device)]
            out.append(onehot.to(device=sub.device, dtype=sub.dtype) @ sub)
        return out

    def random_ids(self, generator: torch.Generator, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """``B x k`` token ids drawn uniformly from ``vocab`` (default: the round-trip vocabulary)."""
        vocab = attack_vocabulary(self.adapter.tokenizers) if vocab is None else vocab.cpu()
        pick = torch.randint(len(vocab), (len(self), self.k), generator=generator)
        return vocab[pick]

    def _check_slots(self, x: torch.Tensor, shape) -> None:
        if tuple(shape) != (len(self), self.k):
            raise ConfigError(f"slot tensor must start with (prompts, k) = {(len(self), self.k)} "
                              f"but starts with {tuple(shape)}")

    # -- encoding ----------------------------------------------------------------------------------
    def token_embeds(self, slots: Sequence[torch.Tensor], encoders: Sequence | None = None) -> list[torch.Tensor]:
        """Full ``B x 77 x D_i`` token embeddings per encoder with ``slots`` spliced in after SOT."""
        if len(slots) != self.n_encoders:
            raise ConfigError(f"give one slot tensor per text encoder ({self.n_encoders}) but got {len(slots)}")
        out = []
        for i, table in enumerate(self.embedding_tables(encoders)):
            base = table[self.base[i].input_ids]
            s = slots[i].to(device=base.device, dtype=base.dtype)
            self._check_slots(s, s.shape[:2])
            out.append(torch.cat([base[:, :1], s, base[:, 1:base.shape[1] - self.k]], 1))
        return out

    def encode(self, slots: Sequence[torch.Tensor], encoders: Sequence | None = None) -> Context:
        """The UNet's context for the prefixed prompts (differentiable in ``slots`` and encoder weights).

        ``encoders`` overrides the pipeline's text encoders (e.g. a trainable copy; same order).
        """
        adapter = self.adapter
        if encoders is not None:
            adapter = copy.copy(adapter)
            adapter.encoders = list(encoders)
        if adapter.mmdit:
            return adapter.encode_token_embeds(self.token_embeds(slots, encoders), self.tokens, self.t5_rows)
        return adapter.encode_token_embeds(self.token_embeds(slots, encoders), self.tokens)

    # -- text -------------------------------------------------------------------------------------
    def prefix_texts(self, ids: torch.Tensor) -> list[str]:
        """The decoded prefix of each row of ``ids`` (``B x k``)."""
        tok = self.adapter.tokenizers[0]
        return [tok.decode(row.tolist()).strip() for row in ids.cpu()]

    def texts(self, ids: torch.Tensor) -> list[str]:
        """Full adversarial prompts as plain text: decoded prefix, a space, the original prompt."""
        self._check_slots(ids, ids.shape)
        return [f"{p} {q}".strip() for p, q in zip(self.prefix_texts(ids), self.prompts)]

    def subset(self, rows: Sequence[int]) -> "PrefixPrompts":
        """The same prefixing for a subset of the prompts (e.g. those still being attacked)."""
        rows = list(rows)
        new = copy.copy(self)
        new.prompts = [self.prompts[r] for r in rows]
        idx = torch.tensor(rows, dtype=torch.long, device=self.base[0].input_ids.device)
        new.base = [Tokens(t.input_ids[idx], t.attention_mask[idx]) for t in self.base]
        new.tokens = [Tokens(t.input_ids[idx], t.attention_mask[idx]) for t in self.tokens]
        if self.t5_rows is not None:
            new.t5_rows = self.t5_rows[idx.to(self.t5_rows.device)]
        return new


def clip_side(adapter: FamilyAdapter) -> FamilyAdapter:
    """``adapter`` itself on the UNet families; on SD 3 / Flux a copy that lists the CLIP tokenizers and encoders
    only (SD 3: CLIP-L, CLIP-G; Flux: CLIP-L), the ones a CLIP token id or token embedding fits."""
    if not adapter.mmdit:
        return adapter
    clip = [i for i, enc in enumerate(adapter.encoders) if type(enc).__name__.startswith("CLIPTextModel")]
    out = copy.copy(adapter)
    out.tokenizers = [adapter.tokenizers[i] for i in clip]
    out.encoders = [adapter.encoders[i] for i in clip]
    return out


def t5_rows(adapter: FamilyAdapter, prompts: list[str]) -> torch.Tensor:
    """The T5 rows of ``prompts`` by the pipeline's ``encode_prompt`` (SD 3: the rows after the 77 CLIP rows,
    zeros without T5; Flux: all rows)."""
    embeds = adapter.encode(prompts).embeds
    return embeds[:, 77:] if adapter.family == "sd3" else embeds
