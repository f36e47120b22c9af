"""Caption -> scene graph with any transformers causal LM (`docs/occlip.md` §4, "LLM parser").

A few-shot prompt asks for the JSON form of `SceneGraph`; the reply is validated strictly (the first balanced
`{...}` block must parse and pass `SceneGraph.from_dict`). A bad reply gets one retry with a stricter
instruction; a second failure falls back to the rule parser with a logged warning. Decoding is greedy, so the
parser is deterministic for a given model. Replies leave through `canonicalize_scene_graph`, like every other
graph, so "left of" and a twice-listed object read as the rule parser's "to the left of" and one node.
"""

import json

from transformers.utils import logging

from .rule_parser import RuleSceneGraphParser, _check_caption
from .scene_graph import SceneGraph, canonicalize_scene_graph

logger = logging.get_logger(__name__)

INSTRUCTION = (
    "Convert the caption into a scene graph in JSON. List each entity once in 'objects' with its 'name' and "
    "'attributes' (attributes inside their object, no pronoun objects). Put spatial, action and possessive links "
    "in 'relations' as {'subject': object index, 'predicate': text, 'object': object index}."
)
EXAMPLES = [
    (
        "a red cube to the left of a blue sphere",
        {
            "objects": [{"name": "cube", "attributes": ["red"]}, {"name": "sphere", "attributes": ["blue"]}],
            "relations": [{"subject": 0, "predicate": "to the left of", "object": 1}],
        },
    ),
    (
        "a small dog chased by a boy in a park",
        {
            "objects": [
                {"name": "dog", "attributes": ["small"]},
                {"name": "boy", "attributes": []},
                {"name": "park", "attributes": []},
            ],
            "relations": [
                {"subject": 1, "predicate": "chasing", "object": 0},
                {"subject": 1, "predicate": "in", "object": 2},
            ],
        },
    ),
    ("two white plates", {"objects": [{"name": "plates", "attributes": ["two", "white"]}], "relations": []}),
]
RETRY_SUFFIX = " Reply with the JSON object only."
# A scene graph nests objects two deep ({"objects": [{...}]}); a reply nested far deeper is not one, and Python's
# JSON reader would hit the recursion limit on it (RecursionError, which the retry and fallback do not catch).
MAX_REPLY_DEPTH = 16


def build_prompt(caption: str, strict: bool = False) -> str:
    """The few-shot prompt for one caption (`strict` adds the retry instruction)."""
    lines = [INSTRUCTION + (RETRY_SUFFIX if strict else ""), ""]
    for example, graph in EXAMPLES:
        lines += [f"Caption: {example}", f"JSON: {json.dumps(graph)}", ""]
    lines += [f"Caption: {caption}", "JSON:"]
    return "\n".join(lines)


def extract_scene_graph(reply: str) -> SceneGraph:
    """The first balanced JSON object in a model reply, validated as a scene graph (`ValueError` otherwise)."""
    start = reply.find("{")
    if start < 0:
        raise ValueError("no JSON object in the reply")
    depth, in_string, escaped = 0, False, False
    for position in range(start, len(reply)):
        char = reply[position]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
            if depth > MAX_REPLY_DEPTH:
                raise ValueError(f"reply JSON is nested more than {MAX_REPLY_DEPTH} levels deep; not a scene graph")
        elif char in "}]":
            depth -= 1
            if depth == 0:
                try:
                    data = json.loads(reply[start : position + 1])
                except (json.JSONDecodeError, RecursionError) as error:  # depth is bounded above; kept as a guard
                    raise ValueError(f"reply JSON does not parse: {error}") from None
                return SceneGraph.from_dict(data)
    raise ValueError("reply JSON is truncated (unbalanced braces)")


class LLMSceneGraphParser:
    """Scene-graph parser on a transformers causal LM, with strict validation, one retry and rule fallback.

    Args:
        model: a local path or Hub id (loaded with `AutoModelForCausalLM`), or a loaded model.
        tokenizer: defaults to `AutoTokenizer.from_pretrained(model)` when `model` is a path or id.
        max_new_tokens: reply budget per caption.
        fallback: parser used after two invalid replies (default: `RuleSceneGraphParser()`).
    """

    def __init__(self, model, tokenizer=None, max_new_tokens: int = 256, fallback=None, device=None, dtype=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model, str):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        if tokenizer is None:
            raise ValueError("LLMSceneGraphParser needs a tokenizer when given a loaded model")
        self.model = model.eval() if device is None else model.to(device).eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.fallback = fallback if fallback is not None else RuleSceneGraphParser()

    def generate(self, prompt: str) -> str:
        """Greedy continuation of `prompt` (the reply text only)."""
        import torch

        inputs = self.tokenizer(prompt, return_tensors="pt").to(self.model.device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            output = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad
            )
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def parse(self, caption: str, index: int = 0) -> SceneGraph:
        """Canonical scene graph of one caption; two invalid replies fall back to the rule parser with a warning."""
        _check_caption(caption, index)
        problems = []
        for strict in (False, True):
            try:
                return canonicalize_scene_graph(extract_scene_graph(self.generate(build_prompt(caption, strict))))
            except ValueError as error:
                problems.append(str(error))
        logger.warning(f"caption {index}: LLM reply invalid twice ({'; '.join(problems)}); using the rule parser")
        return self.fallback.parse(caption)  # the rule parser's graphs are canonical already

    def parse_batch(self, captions: list[str]) -> list[SceneGraph]:
        """Scene graphs of many captions (one generation per caption)."""
        if isinstance(captions, str):
            raise TypeError("parse_batch takes a list of captions; use parse() for one caption")
        for i, caption in enumerate(captions):
            _check_caption(caption, i)
        return [self.parse(caption, i) for i, caption in enumerate(captions)]
