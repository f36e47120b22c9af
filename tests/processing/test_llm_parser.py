"""LLM scene-graph parser: JSON handling on recorded replies, retry and fallback, and a tiny random LM end to end."""

import json
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from processing import LLMSceneGraphParser, RuleSceneGraphParser, bundled_clip_tokenizer
from processing.llm_parser import build_prompt, extract_scene_graph

VALID = {
    "objects": [{"name": "cube", "attributes": ["red"]}, {"name": "sphere", "attributes": ["blue"]}],
    "relations": [{"subject": 0, "predicate": "to the left of", "object": 1}],
}


class RecordedParser(LLMSceneGraphParser):
    """Replays recorded model replies instead of generating."""

    def __init__(self, replies):
        self.replies, self.prompts = list(replies), []
        self.fallback, self.max_new_tokens = RuleSceneGraphParser(), 0

    def generate(self, prompt):
        self.prompts.append(prompt)
        return self.replies.pop(0)


def test_extracts_json_with_prose_around_it():
    reply = f'Sure! Here is the graph: {json.dumps(VALID)}\nCaption: next one {{"objects": []}}'
    assert extract_scene_graph(reply).to_dict() == VALID


def test_braces_inside_strings_do_not_confuse_extraction():
    data = {"objects": [{"name": "sign {stop}", "attributes": []}], "relations": []}
    assert extract_scene_graph("JSON: " + json.dumps(data) + " trailing").to_dict() == data


@pytest.mark.parametrize(
    "reply, message",
    [
        ('{"objects": [{"name": "cube", "attributes": ["red"]}', "truncated"),
        ("I cannot do that.", "no JSON object"),
        ('{"objects": [{"name": "a"}], "relations": [{"subject": 0, "predicate": "on", "object": 4}]}', "object = 4"),
        ("{'objects': []}", "does not parse"),
    ],
)
def test_bad_replies_are_rejected(reply, message):
    with pytest.raises(ValueError, match=message):
        extract_scene_graph(reply)


def test_valid_first_reply_is_used_without_retry():
    parser = RecordedParser([json.dumps(VALID)])
    assert parser.parse("a red cube to the left of a blue sphere").to_dict() == VALID
    assert len(parser.prompts) == 1 and parser.prompts[0].endswith(
        "Caption: a red cube to the left of a blue sphere\nJSON:"
    )


def test_reply_is_canonicalized_like_the_rule_parser():
    reply = {
        "objects": [{"name": "cube", "attributes": ["red"]}, {"name": "sphere", "attributes": ["blue"]}]
        + [{"name": "cube", "attributes": ["red"]}],
        "relations": [
            {"subject": 0, "predicate": "Left of", "object": 1},
            {"subject": 2, "predicate": "on the left of", "object": 1},
        ],
    }
    caption = "a red cube to the left of a blue sphere"
    graph = RecordedParser([json.dumps(reply)]).parse(caption)
    assert graph.to_dict() == VALID == RuleSceneGraphParser().parse(caption).to_dict()


def test_one_retry_with_stricter_prompt_then_success():
    parser = RecordedParser(['{"objects": [{"name": "cube"', "ok: " + json.dumps(VALID)])
    assert parser.parse("a red cube left of a blue sphere").to_dict() == VALID
    assert parser.prompts == [
        build_prompt("a red cube left of a blue sphere"),
        build_prompt("a red cube left of a blue sphere", True),
    ]


def test_two_bad_replies_fall_back_to_rule_parser_with_warning(caplog):
    parser = RecordedParser(["nothing", '{"objects": []}'])
    with caplog.at_level(logging.WARNING):
        graph = parser.parse("a dog on a mat", index=5)
    assert graph == RuleSceneGraphParser().parse("a dog on a mat")
    assert "caption 5: LLM reply invalid twice" in caplog.text


def tiny_causal_lm():
    """A random 1-layer Llama over the bundled CLIP vocabulary, and that tokenizer."""
    torch.manual_seed(0)
    tokenizer = bundled_clip_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return LlamaForCausalLM(config), tokenizer


def test_loads_a_local_model_path(tmp_path):
    model, tokenizer = tiny_causal_lm()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    from_path = LLMSceneGraphParser(str(tmp_path), max_new_tokens=5)
    from_model = LLMSceneGraphParser(model, tokenizer=tokenizer, max_new_tokens=5)
    prompt = build_prompt("a red cube")
    assert from_path.generate(prompt) == from_model.generate(prompt)


def test_tiny_random_causal_lm_end_to_end(caplog):
    model, tokenizer = tiny_causal_lm()
    parser = LLMSceneGraphParser(model, tokenizer=tokenizer, max_new_tokens=6)
    reply = parser.generate(build_prompt("a cat"))
    assert isinstance(reply, str)
    with caplog.at_level(logging.WARNING):
        graphs = parser.parse_batch(["a cat on a mat", "a red cube"])
    assert graphs == RuleSceneGraphParser().parse_batch(["a cat on a mat", "a red cube"])  # random LM: no JSON
    assert caplog.text.count("LLM reply invalid twice") == 2
    with pytest.raises(ValueError, match="caption 1 is empty"):
        parser.parse_batch(["a cat", ""])
