"""open_clip -> transformers CLIP conversion, checked against a reference forward written on open_clip's own tensors.

The state dicts are built here with open_clip's parameter names and shapes (tiny sizes, random values); the
reference below follows open_clip's `VisionTransformer` / `TextTransformer` math directly, so the comparison does
not depend on the conversion's renaming.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPModel, CLIPProcessor

from examples import convert_open_clip
from processing.open_clip_conversion import (
    OpenClipConversionError,
    clip_config_from_open_clip,
    cloc_from_open_clip,
    from_open_clip,
    occlip_from_open_clip,
)
from tests.factories import tiny_binding_config

# B/16-like: patch 16, nn.GELU; L/14-like: patch 14, QuickGELU, head_width != 64 and a non-default mlp_ratio.
B16_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 48, "layers": 2, "width": 32, "head_width": 8, "patch_size": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 64, "width": 24, "heads": 4, "layers": 2},
}
L14_CONFIG = {
    "embed_dim": 20,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 28, "layers": 3, "width": 48, "head_width": 16, "patch_size": 14, "mlp_ratio": 3.0},
    "text_cfg": {"context_length": 10, "vocab_size": 50, "width": 32, "heads": 4, "layers": 2},
}


def _block(prefix: str, width: int, mlp: int, generator) -> dict:
    def randn(*shape, scale=0.1):
        return torch.randn(*shape, generator=generator) * scale

    return {
        f"{prefix}.ln_1.weight": 1 + randn(width),
        f"{prefix}.ln_1.bias": randn(width),
        f"{prefix}.attn.in_proj_weight": randn(3 * width, width, scale=width**-0.5),
        f"{prefix}.attn.in_proj_bias": randn(3 * width),
        f"{prefix}.attn.out_proj.weight": randn(width, width, scale=width**-0.5),
        f"{prefix}.attn.out_proj.bias": randn(width),
        f"{prefix}.ln_2.weight": 1 + randn(width),
        f"{prefix}.ln_2.bias": randn(width),
        f"{prefix}.mlp.c_fc.weight": randn(mlp, width, scale=width**-0.5),
        f"{prefix}.mlp.c_fc.bias": randn(mlp),
        f"{prefix}.mlp.c_proj.weight": randn(width, mlp, scale=mlp**-0.5),
        f"{prefix}.mlp.c_proj.bias": randn(width),
    }


def open_clip_state_dict(config: dict, seed: int = 0) -> dict:
    """Random weights with open_clip `CLIP`'s names and shapes for `config`."""
    generator = torch.Generator().manual_seed(seed)
    vision, text, embed = config["vision_cfg"], config["text_cfg"], config["embed_dim"]
    width, patch, grid = vision["width"], vision["patch_size"], vision["image_size"] // vision["patch_size"]
    twidth = text["width"]

    def randn(*shape, scale=0.1):
        return torch.randn(*shape, generator=generator) * scale

    state = {
        "visual.conv1.weight": randn(width, 3, patch, patch, scale=(3 * patch * patch) ** -0.5),
        "visual.class_embedding": randn(width, scale=width**-0.5),
        "visual.positional_embedding": randn(grid * grid + 1, width, scale=width**-0.5),
        "visual.ln_pre.weight": 1 + randn(width),
        "visual.ln_pre.bias": randn(width),
        "visual.ln_post.weight": 1 + randn(width),
        "visual.ln_post.bias": randn(width),
        "visual.proj": randn(width, embed, scale=width**-0.5),
        "token_embedding.weight": randn(text["vocab_size"], twidth, scale=0.02 * 10),
        "positional_embedding": randn(text["context_length"], twidth),
        "ln_final.weight": 1 + randn(twidth),
        "ln_final.bias": randn(twidth),
        "text_projection": randn(twidth, embed, scale=twidth**-0.5),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    vision_mlp = int(width * vision.get("mlp_ratio", 4.0))
    for index in range(vision["layers"]):
        state.update(_block(f"visual.transformer.resblocks.{index}", width, vision_mlp, generator))
    for index in range(text["layers"]):
        state.update(_block(f"transformer.resblocks.{index}", twidth, 4 * twidth, generator))
    return state


# ---------------------------------------------------------------------------------------- open_clip's math


def _act(config):
    return (lambda x: x * torch.sigmoid(1.702 * x)) if config.get("quick_gelu") else F.gelu


def _layer_norm(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)


def _resblock(x, state, prefix, heads, act, attn_mask=None):
    batch, length, width = x.shape
    head_dim = width // heads
    h = _layer_norm(x, state, f"{prefix}.ln_1")
    q, k, v = F.linear(h, state[f"{prefix}.attn.in_proj_weight"], state[f"{prefix}.attn.in_proj_bias"]).chunk(3, -1)
    q, k, v = (t.reshape(batch, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    scores = (q * head_dim**-0.5) @ k.transpose(-1, -2)
    if attn_mask is not None:
        scores = scores + attn_mask
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)
    x = x + F.linear(attended, state[f"{prefix}.attn.out_proj.weight"], state[f"{prefix}.attn.out_proj.bias"])
    h = _layer_norm(x, state, f"{prefix}.ln_2")
    h = act(F.linear(h, state[f"{prefix}.mlp.c_fc.weight"], state[f"{prefix}.mlp.c_fc.bias"]))
    return x + F.linear(h, state[f"{prefix}.mlp.c_proj.weight"], state[f"{prefix}.mlp.c_proj.bias"])


def reference_image_features(state, config, pixels):
    """open_clip `VisionTransformer.forward`: conv patches, class token, pos emb, ln_pre, blocks, ln_post, @ proj."""
    vision = config["vision_cfg"]
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=vision["patch_size"])
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = state["visual.class_embedding"].view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + state["visual.positional_embedding"]
    x = _layer_norm(x, state, "visual.ln_pre")
    heads = vision["width"] // vision["head_width"]
    for index in range(vision["layers"]):
        x = _resblock(x, state, f"visual.transformer.resblocks.{index}", heads, _act(config))
    return _layer_norm(x[:, 0], state, "visual.ln_post") @ state["visual.proj"]


def reference_text_features(state, config, text):
    """open_clip `CLIP.encode_text`: token + pos emb, causal blocks, ln_final, the argmax (EOT) token, @ proj."""
    cfg = config["text_cfg"]
    x = state["token_embedding.weight"][text] + state["positional_embedding"][: text.shape[1]]
    causal = torch.full((text.shape[1], text.shape[1]), float("-inf")).triu(1)
    for index in range(cfg["layers"]):
        x = _resblock(x, state, f"transformer.resblocks.{index}", cfg["heads"], _act(config), causal)
    x = _layer_norm(x, state, "ln_final")
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ state["text_projection"]


def open_clip_tokens(config, lengths, seed=0):
    """open_clip-style token rows: SOT, words, EOT (the largest id), zero padding to the context length."""
    cfg = config["text_cfg"]
    vocab, context = cfg["vocab_size"], cfg["context_length"]
    generator = torch.Generator().manual_seed(seed)
    rows = torch.zeros(len(lengths), context, dtype=torch.long)
    for row, words in enumerate(lengths):
        rows[row, 0] = vocab - 2
        rows[row, 1 : 1 + words] = torch.randint(1, vocab - 2, (words,), generator=generator)
        rows[row, 1 + words] = vocab - 1
    return rows


def _pixels(config, batch=3, seed=0):
    size = config["vision_cfg"]["image_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _features(output):
    return output.pooler_output if hasattr(output, "pooler_output") else output


# ---------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("config", [B16_CONFIG, L14_CONFIG], ids=["B16-like", "L14-like-quickgelu"])
@torch.no_grad()
def test_converted_clip_matches_open_clip_forward(config):
    state = open_clip_state_dict(config)
    model = from_open_clip(state, config)
    assert isinstance(model, CLIPModel)
    assert model.config.vision_config.hidden_act == ("quick_gelu" if config.get("quick_gelu") else "gelu")
    assert model.config.text_config.hidden_act == model.config.vision_config.hidden_act
    assert model.config.vision_config.patch_size == config["vision_cfg"]["patch_size"]

    pixels = _pixels(config)
    expected_image = reference_image_features(state, config, pixels)
    torch.testing.assert_close(
        _features(model.get_image_features(pixel_values=pixels)), expected_image, atol=1e-5, rtol=0
    )

    tokens = open_clip_tokens(config, [1, 4, config["text_cfg"]["context_length"] - 2])
    expected_text = reference_text_features(state, config, tokens)
    torch.testing.assert_close(_features(model.get_text_features(input_ids=tokens)), expected_text, atol=1e-5, rtol=0)
    # With a padding mask, and trimmed to the longest caption (as a transformers tokenizer would give), the
    # pooled end-of-text token is unchanged: the text attention is causal.
    mask = (tokens != 0).long()
    masked = _features(model.get_text_features(input_ids=tokens, attention_mask=mask))
    torch.testing.assert_close(masked, expected_text, atol=1e-5, rtol=0)
    short = open_clip_tokens(config, [1, 3])
    trimmed = _features(model.get_text_features(input_ids=short[:, :5], attention_mask=mask[:2, :5]))
    torch.testing.assert_close(trimmed, reference_text_features(state, config, short), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.logit_scale, state["logit_scale"])


@torch.no_grad()
def test_pooling_is_open_clips_argmax_even_if_a_larger_id_follows():
    """transformers pools at `input_ids.argmax` when `eos_token_id == 2`: the converted config keeps that rule."""
    config = B16_CONFIG
    state = open_clip_state_dict(config, seed=1)
    model = from_open_clip(state, config)
    assert model.config.text_config.eos_token_id == 2
    tokens = open_clip_tokens(config, [2, 3])
    tokens[0, 1] = config["text_cfg"]["vocab_size"] - 1  # the argmax is now an early token, as in open_clip
    expected = reference_text_features(state, config, tokens)
    torch.testing.assert_close(_features(model.get_text_features(input_ids=tokens)), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_checkpoint_wrappers_custom_text_prefix_and_nonscalar_logit_scale():
    config = L14_CONFIG
    state = open_clip_state_dict(config, seed=2)
    pixels = _pixels(config, batch=2)
    expected = reference_image_features(state, config, pixels)
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    wrapped["state_dict"]["module.logit_scale"] = state["logit_scale"].reshape(1)
    custom_text = {  # CustomTextCLIP keeps the same text transformer under `text.`
        (f"text.{k}" if not k.startswith(("visual.", "logit_scale")) else k): v for k, v in state.items()
    }
    custom_text["text.attn_mask"] = torch.zeros(1)  # a non-weight buffer in older files; ignored
    for variant in (wrapped, custom_text):
        model = from_open_clip(variant, {"model_cfg": config, "preprocess_cfg": {}})
        torch.testing.assert_close(
            _features(model.get_image_features(pixel_values=pixels)), expected, atol=1e-5, rtol=0
        )
        tokens = open_clip_tokens(config, [3])
        text = reference_text_features(state, config, tokens)
        torch.testing.assert_close(_features(model.get_text_features(input_ids=tokens)), text, atol=1e-5, rtol=0)


@torch.no_grad()
def test_occlip_and_cloc_keep_the_converted_towers():
    config = B16_CONFIG
    state = open_clip_state_dict(config, seed=3)
    pixels = _pixels(config, batch=2)
    tokens = open_clip_tokens(config, [2, 5])
    image, text = reference_image_features(state, config, pixels), reference_text_features(state, config, tokens)

    occlip = occlip_from_open_clip(state, config, binding_config=tiny_binding_config()).eval()
    torch.testing.assert_close(occlip.get_image_features(pixels).pooler_output, image, atol=1e-5, rtol=0)
    occlip_text = occlip.get_text_features(input_ids=tokens).pooler_output
    torch.testing.assert_close(occlip_text, text, atol=1e-5, rtol=0)
    torch.testing.assert_close(occlip.logit_scale, state["logit_scale"])

    cloc = cloc_from_open_clip(state, config, prompter_config={"initializer_range": 0.2}).eval()
    torch.testing.assert_close(cloc.get_image_features(pixels).pooler_output, image, atol=1e-5, rtol=0)
    torch.testing.assert_close(cloc.get_text_features(tokens).pooler_output, text, atol=1e-5, rtol=0)
    # CLOC's region head starts as CLIP's own head: open_clip's ln_post and proj.
    torch.testing.assert_close(cloc.prompter.projection.weight, state["visual.proj"].t())
    torch.testing.assert_close(cloc.prompter.post_layernorm.weight, state["visual.ln_post.weight"])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["vision_cfg"].update(attentional_pool=True), "attentional_pool"),
        (lambda c: c["vision_cfg"].update(timm_model_name="vit_base_patch16_224"), "timm"),
        (lambda c: c["vision_cfg"].update(layers=[3, 4, 6, 3]), "ModifiedResNet"),
        (lambda c: c["vision_cfg"].update(pool_type="avg"), "pool_type='avg'"),
        (lambda c: c["vision_cfg"].update(ls_init_value=1e-5), "ls_init_value"),
        (lambda c: c["vision_cfg"].update(image_size=[48, 32]), "not square"),
        (lambda c: c["vision_cfg"].update(qk_norm=True), "custom attention block"),
        (lambda c: c["text_cfg"].update(hf_model_name="roberta-base"), "Hugging Face text towers"),
        (lambda c: c["text_cfg"].update(no_causal_mask=True), "no_causal_mask"),
        (lambda c: c["text_cfg"].update(pool_type="last"), "pool_type='last'"),
        (lambda c: c["text_cfg"].update(proj_bias=True), "proj_bias=True"),
        (lambda c: c["text_cfg"].update(text_arch="modern"), "text_arch='modern'"),
        (lambda c: c["text_cfg"].update(brand_new_option=1), "brand_new_option"),
        (lambda c: c.update(init_logit_bias=-10), "SigLIP"),
        (lambda c: c.update(multimodal_cfg={"width": 8}), "CoCa"),
    ],
)
def test_unsupported_configs_are_refused_by_name(change, message):
    config = json.loads(json.dumps(B16_CONFIG))
    change(config)
    with pytest.raises(OpenClipConversionError, match=message.replace("[", r"\[").replace("(", r"\(")):
        clip_config_from_open_clip(config)


def test_eos_pooling_maps_to_first_eos_token_and_norm_eps_is_kept():
    config = json.loads(json.dumps(B16_CONFIG))
    config["text_cfg"].update(pool_type="eos", eos_id=63, norm_kwargs={"eps": 1e-6})
    converted = clip_config_from_open_clip(config)
    assert converted.text_config.eos_token_id == 63
    assert converted.text_config.layer_norm_eps == 1e-6
    assert converted.vision_config.layer_norm_eps == 1e-5


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update({"visual.attn_pool.query": torch.zeros(4, 16)}), "attn_pool"),
        (lambda s: s.update({"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)}), "layer scale"),
        (lambda s: s.update({"logit_bias": torch.zeros(())}), "logit_bias"),
        (lambda s: s.pop("visual.transformer.resblocks.1.attn.in_proj_weight"), "lacks"),
        (lambda s: s.update({"visual.proj": torch.zeros(32, 8)}), "shape"),
    ],
)
def test_state_dicts_that_do_not_fit_are_refused_by_name(change, message):
    state = open_clip_state_dict(B16_CONFIG)
    change(state)
    with pytest.raises(OpenClipConversionError, match=message):
        from_open_clip(state, B16_CONFIG)


def test_cli_writes_a_transformers_clip_folder(tmp_path):
    config = json.loads(json.dumps(B16_CONFIG))
    config["text_cfg"]["vocab_size"] = 49408  # OpenAI's BPE vocabulary, so the bundled tokenizer is written too
    state = open_clip_state_dict(config, seed=4)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "open_clip_model.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "open_clip_pytorch_model.bin")
    config_path = tmp_path / "open_clip_config.json"
    config_path.write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    pixels = _pixels(config, batch=2)
    expected = reference_image_features(state, config, pixels)
    for checkpoint in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        out = tmp_path / f"out_{checkpoint.split('.')[-1]}"
        argv = [
            "--checkpoint",
            str(tmp_path / checkpoint),
            "--model_config",
            str(config_path),
            "--output_dir",
            str(out),
        ]
        convert_open_clip.main(argv)
        model = CLIPModel.from_pretrained(out).eval()
        with torch.no_grad():
            image = _features(model.get_image_features(pixel_values=pixels))
        torch.testing.assert_close(image, expected, atol=1e-5, rtol=0)
        processor = CLIPProcessor.from_pretrained(out)
        assert processor.image_processor.crop_size == {"height": 48, "width": 48}
        assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]
        assert processor.tokenizer.model_max_length == 12
        tokens = processor(text=["a red cube"], return_tensors="pt")["input_ids"]
        assert tokens[0, 0] == 49406 and tokens[0].argmax() == 4  # SOT a red cube EOT: pooled at EOT
        with pytest.raises(ValueError, match="already holds a model"):
            convert_open_clip.main(argv)
