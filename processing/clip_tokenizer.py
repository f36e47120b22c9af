"""The CLIP BPE tokenizer, built from the vocabulary bundled in this package: no download, ever.

`processing/data/bpe_simple_vocab_16e6.txt.gz` comes from the open-clip-torch wheel (MIT licence, notice in
`processing/data/LICENSE-open_clip.txt`). CLIP's vocabulary is derived from that merge list: the 256 byte
symbols, the same with the end-of-word marker `</w>`, one token per merge, then the two special tokens.
"""

import gzip
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BPE_FILE = Path(__file__).resolve().parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges of the file, giving a 49408-token vocabulary
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"


def byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes stand for themselves, the others map to U+0100 upwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's token-to-id map (49408 entries) and BPE merge list from the bundled file."""
    with gzip.open(BPE_FILE, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def bundled_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A transformers `CLIPTokenizer` equal to OpenAI CLIP's, built offline from the bundled vocabulary."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
