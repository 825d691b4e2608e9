"""CLIP's BPE tokenizer, rebuilt offline from the vocabulary file inside open-clip-torch.

Stable Diffusion's tokenizer (``openai/clip-vit-large-patch14``) and open_clip's ``SimpleTokenizer``
share one byte-pair vocabulary: 256 byte symbols, the same 256 with ``</w>``, 48,894 merges, then the
start and end tokens (49,408 ids in all). open-clip-torch ships the merges as
``bpe_simple_vocab_16e6.txt.gz``; this module writes the ``vocab.json`` / ``merges.txt`` pair that
``transformers.CLIPTokenizer`` reads, so token ids are identical to Stable Diffusion's with no hub.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

N_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@lru_cache(maxsize=1)
def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte-to-unicode table, in byte order of its definition."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def open_clip_bpe_path() -> Path:
    """Path of the BPE merges file that ships inside open-clip-torch."""
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - open-clip-torch is a runtime dependency
        raise ImportError("open-clip-torch is required: pip install open-clip-torch") from e
    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_tokenizer(out_dir: str | Path, bpe_path: str | Path | None = None) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs for SD's CLIP tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_path or open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1:N_MERGES + 1]
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
        "add_prefix_space": False, "errors": "replace"}, indent=1))
    return out
