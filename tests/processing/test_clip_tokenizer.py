"""The bundled CLIP tokenizer: known OpenAI CLIP ids and agreement with a plain reference BPE."""

import gzip

import pytest

from processing.clip_tokenizer import BPE_FILE, NUM_MERGES, bundled_clip_tokenizer, clip_vocab_and_merges


@pytest.fixture(scope="module")
def tokenizer():
    return bundled_clip_tokenizer()


def test_known_openai_clip_ids(tokenizer):
    # Ids printed by OpenAI's `clip.tokenize` for these prompts (CLIP README / model card examples).
    assert tokenizer(["a diagram", "a dog", "a cat"]).input_ids == [
        [49406, 320, 22697, 49407],
        [49406, 320, 1929, 49407],
        [49406, 320, 2368, 49407],
    ]
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer.model_max_length == 77


def reference_bpe(word: str, ranks: dict) -> list[str]:
    """Textbook BPE on one lower-case ASCII word: repeatedly merge the lowest-ranked adjacent pair."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
    return parts


@pytest.mark.parametrize(
    "text", ["red cube to the left of blue sphere", "zebras grazing beside acacias", "xylophonist quizzically"]
)
def test_matches_reference_bpe(tokenizer, text):
    vocab, merges = clip_vocab_and_merges()
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    expected = [vocab[piece] for word in text.split() for piece in reference_bpe(word, ranks)]
    assert tokenizer(text, add_special_tokens=False).input_ids == expected


def test_vocabulary_is_derived_from_the_bundled_merges():
    vocab, merges = clip_vocab_and_merges()
    with gzip.open(BPE_FILE, "rt", encoding="utf-8") as handle:
        assert handle.readline().startswith('"bpe_simple_vocab_16e6.txt#version')
    assert len(merges) == NUM_MERGES and len(vocab) == 49408
    assert vocab["".join(merges[0])] == 512 and vocab["<|endoftext|>"] == 49407


def test_save_and_reload_round_trip(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = ["a small red cube on top of a green cylinder", "two dogs"]
    assert reloaded(text, padding=True).input_ids == tokenizer(text, padding=True).input_ids
