"""Region phrase candidates for VESL (`docs/cloc.md`, "VESL pipeline", step 2).

Caption mode (`extract_region_phrases`): spaCy tags the caption, noun-phrase chunks are the maximal runs
"optional determiner, any adjectives, one or more nouns" (as the paper's NLTK chunker), generic web words are
removed from each chunk, the leading determiner is dropped, chunks left with only stop words are dropped, and the
rest are lower-cased, de-duplicated and kept in caption order up to `max_phrases` (20, the paper's cap).

Baseline mode (`alt_text_ngrams`): the OWL-ST recipe the CLOC paper compares against (the "no VESL" rows): word
n-grams of the alt-text. Defaults, our choices: n up to 10 (OWL-ST's longest n-gram; it also fits OWLv2's 16-token
text queries) and at most 64 n-grams per image, shortest first, so that a long alt-text does not make detection
several times costlier than caption mode.
"""

import re

from .rule_parser import caption_preview, caption_problem, load_spacy

# Words that describe the web file, not the scene (the OWLv2 paper's filter list: stock, photo, image, picture,
# wallpaper, jpg, png, ...; extended by us with plurals, other file types and stock-photo sites).
WEB_WORDS = frozenset(
    """
    stock photo photos photograph photographs photography image images picture pictures pic pics img
    wallpaper wallpapers jpg jpeg png gif webp bmp svg tif tiff vector vectors clipart royalty download
    thumbnail thumbnails hd hq 4k shutterstock istock istockphoto alamy getty gettyimages dreamstime
    depositphotos 123rf pixabay unsplash
    """.split()
)

NOUN_TAGS = ("NOUN", "PROPN")
DEFAULT_MAX_PHRASES = 20
DEFAULT_MAX_N = 10
DEFAULT_MAX_NGRAMS = 64

_WORD = re.compile(r"[a-z0-9]+(?:['\u2019-][a-z0-9]+)*")
_BREAK = re.compile(r"[.,;:!?()\[\]{}\"|/\u2013\u2014]+|\s-\s")  # n-grams do not cross punctuation


def _stop_words() -> frozenset:
    from spacy.lang.en.stop_words import STOP_WORDS

    return frozenset(STOP_WORDS)


def _check_text(text, name: str) -> str:
    problem = caption_problem(text, allow_empty=True)
    if problem is None:
        return text
    if not isinstance(text, str):
        raise TypeError(f"{name} {problem}")
    raise ValueError(f"{name} {caption_preview(text)} {problem}")


def _check_cap(value: int, name: str) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _is_web_word(token) -> bool:
    return token.lower_ in WEB_WORDS or token.lemma_.lower() in WEB_WORDS


def _joins_word(doc, index: int) -> bool:
    """A hyphen written inside a word ("t-shirt"), which spaCy splits off as punctuation."""
    token = doc[index]
    return (
        token.text == "-"
        and index > 0
        and not doc[index - 1].whitespace_
        and not token.whitespace_
        and index + 1 < len(doc)
    )


def _chunks(doc):
    """Token lists of the maximal "DET? ADJ* NOUN+" runs, left to right, determiner left out."""
    index, end = 0, len(doc)
    while index < end:
        cursor = index + 1 if doc[index].pos_ == "DET" else index
        start = cursor
        while cursor < end and (doc[cursor].pos_ == "ADJ" or (cursor > start and _joins_word(doc, cursor))):
            cursor += 1
        nouns_start = cursor
        while cursor < end and (doc[cursor].pos_ in NOUN_TAGS or (cursor > nouns_start and _joins_word(doc, cursor))):
            cursor += 1
        if cursor > nouns_start and doc[cursor - 1].text != "-":
            yield [doc[i] for i in range(start, cursor)]
            index = cursor
        else:
            index += 1


def _phrase(tokens, stop_words) -> str | None:
    kept = [t for t in tokens if not _is_web_word(t)]
    while kept and kept[0].pos_ == "DET":
        kept = kept[1:]
    if not any(t.is_alpha and t.lower_ not in stop_words for t in kept):
        return None
    return "".join(t.text_with_ws for t in kept).strip().lower()


def _phrases_of(doc, max_phrases: int, stop_words) -> list[str]:
    phrases: list[str] = []
    for tokens in _chunks(doc):
        phrase = _phrase(tokens, stop_words)
        if phrase and phrase not in phrases:
            phrases.append(phrase)
            if len(phrases) == max_phrases:
                break
    return phrases


def extract_region_phrases_batch(
    captions: list[str], max_phrases: int = DEFAULT_MAX_PHRASES, batch_size: int = 256
) -> list[list[str]]:
    """`extract_region_phrases` for many captions at once (spaCy's `pipe`, much faster than one by one)."""
    _check_cap(max_phrases, "max_phrases")
    texts = [_check_text(caption, f"caption {index}") for index, caption in enumerate(captions)]
    stop_words = _stop_words()
    nlp = load_spacy()
    return [_phrases_of(doc, max_phrases, stop_words) for doc in nlp.pipe(texts, batch_size=batch_size)]


def extract_region_phrases(caption: str, max_phrases: int = DEFAULT_MAX_PHRASES) -> list[str]:
    """Noun phrases of `caption` as region-text candidates, in caption order.

    Lower-cased, leading determiners stripped, generic web words ("photo", "stock", "jpg", ...) removed,
    stop-word-only phrases dropped, de-duplicated, at most `max_phrases`:
    "A photo of a red car parked next to the old brick house" -> ["red car", "old brick house"].
    """
    return extract_region_phrases_batch([caption], max_phrases)[0]


def alt_text_ngrams(text: str, max_n: int = DEFAULT_MAX_N, max_ngrams: int = DEFAULT_MAX_NGRAMS) -> list[str]:
    """Word n-grams (n = 1..`max_n`) of an alt-text, the OWL-ST query recipe (the CLOC paper's "no VESL" baseline).

    Words are lower-cased alphanumeric runs (inner apostrophes and hyphens kept); n-grams do not cross
    punctuation. N-grams made only of stop words, or containing a generic web word, are dropped; the rest are
    de-duplicated and ordered shortest first, then by position, keeping at most `max_ngrams`.
    """
    _check_text(text, "text")
    _check_cap(max_n, "max_n")
    _check_cap(max_ngrams, "max_ngrams")
    stop_words = _stop_words()
    segments = [_WORD.findall(part) for part in _BREAK.split(text.lower())]
    ngrams: list[str] = []
    seen: set[str] = set()
    for n in range(1, max_n + 1):
        for words in segments:
            for start in range(len(words) - n + 1):
                window = words[start : start + n]
                if any(w in WEB_WORDS for w in window) or all(w in stop_words for w in window):
                    continue
                ngram = " ".join(window)
                if ngram not in seen:
                    seen.add(ngram)
                    ngrams.append(ngram)
                    if len(ngrams) == max_ngrams:
                        return ngrams
    return ngrams
