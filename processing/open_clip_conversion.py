"""open_clip checkpoints -> transformers `CLIPModel` -> OC-CLIP / CLOC, without importing open_clip.

open_clip's `CLIP` (ViT image tower, built-in text transformer) holds the same computation as transformers'
`CLIPModel`; only the layout differs: the attention's fused `in_proj` is split into q/k/v, the `[in, out]`
projection matrices are transposed into `nn.Linear` weights, and the activation follows the `quick_gelu` flag.
Settings that change the computation in ways `CLIPModel` cannot hold (attentional pooling, timm or ResNet image
towers, Hugging Face text towers, layer scale, SigLIP's logit bias, ...) are refused by name.
"""

import json
from os import PathLike
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

from .clip_tokenizer import bundled_clip_tokenizer

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_VOCAB_SIZE = 49408

# transformers' CLIP text tower pools at `input_ids.argmax(-1)` exactly when `eos_token_id == 2` (its legacy
# rule); that is open_clip's default `pool_type='argmax'` (the end-of-text token has the largest id).
ARGMAX_POOLING_EOS_ID = 2

# Keys of open_clip's CLIPVisionCfg / CLIPTextCfg whose values do not change the converted computation, or are
# checked below. Anything else is refused, so a new open_clip option is never silently dropped.
_VISION_KEYS = {
    "layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "image_seq_len", "ls_init_value",
    "patch_dropout", "attentional_pool", "attn_pooler_queries", "attn_pooler_heads", "no_ln_pre", "pos_embed_type",
    "final_ln_after_pool", "pool_type", "output_tokens", "act_kwargs", "norm_kwargs", "block_type", "qk_norm",
    "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc", "timm_model_name",
    "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path",
    "timm_model_kwargs", "input_patchnorm", "global_average_pool",
}  # fmt: skip
_TEXT_KEYS = {
    "text_arch", "context_length", "variable_text", "vocab_size", "hf_tokenizer_name", "tokenizer_mode",
    "tokenizer_kwargs", "width", "heads", "layers", "mlp_ratio", "ls_init_value", "embed_cls", "pad_id", "bos_id",
    "eos_id", "tokenizer_type", "tiktoken_name", "no_causal_mask", "final_ln_after_pool", "pool_type", "proj_bias",
    "proj_type", "output_tokens", "act_kwargs", "norm_kwargs", "block_type", "qk_norm", "scaled_cosine_attn",
    "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc", "hf_model_name", "hf_model_pretrained",
    "hf_proj_type", "hf_pooler_type", "hf_model_config",
}  # fmt: skip
_TOP_KEYS = {
    "embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
    "nonscalar_logit_scale", "cast_dtype", "custom_text", "output_dict", "multimodal_cfg",
}  # fmt: skip
# Custom attention blocks (qk norm, cosine attention, head scales, sub-LN) have parameters CLIP's layers lack.
_CUSTOM_BLOCK_FLAGS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
# Not weights: the causal mask buffer and the scalars OpenAI's JIT archives carried.
_IGNORED_KEYS = {"attn_mask", "text.attn_mask", "input_resolution", "context_length", "vocab_size"}
_TEXT_TOWER_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


class OpenClipConversionError(ValueError):
    """An open_clip config or state dict that a transformers `CLIPModel` cannot reproduce."""


def _pair(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise OpenClipConversionError(
                f"vision_cfg.{name}={list(value)} is not square; transformers' CLIP takes one {name}."
            )
        return int(value[0])
    return int(value)


def _layer_norm_eps(cfg: dict, tower: str) -> float:
    norm_kwargs = dict(cfg.get("norm_kwargs") or {})
    eps = norm_kwargs.pop("eps", 1e-5)  # torch LayerNorm's default, which open_clip keeps
    if norm_kwargs:
        raise OpenClipConversionError(f"{tower}.norm_kwargs {sorted(norm_kwargs)} are not supported (only eps).")
    return float(eps)


def _refuse_common(cfg: dict, tower: str, known: set[str]) -> None:
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise OpenClipConversionError(
            f"{tower} has settings this conversion does not know: {unknown}; it cannot tell whether they change the "
            "tower, so it refuses rather than convert silently wrong."
        )
    if cfg.get("ls_init_value") is not None:
        raise OpenClipConversionError(
            f"{tower}.ls_init_value is set: layer scale (ls_1/ls_2) has no counterpart in transformers' CLIP layers."
        )
    custom = [flag for flag in _CUSTOM_BLOCK_FLAGS if cfg.get(flag)]
    if custom or cfg.get("block_type") not in (None, "default"):
        raise OpenClipConversionError(
            f"{tower} uses open_clip's custom attention block ({custom or cfg.get('block_type')}), which "
            "transformers' CLIP layers cannot hold."
        )
    if cfg.get("act_kwargs"):
        raise OpenClipConversionError(f"{tower}.act_kwargs {cfg['act_kwargs']} are not supported.")


def _normalise_model_config(model_config: dict | str | PathLike) -> dict:
    if not isinstance(model_config, dict):
        with open(model_config) as handle:
            model_config = json.load(handle)
    if not isinstance(model_config, dict):
        raise OpenClipConversionError("the open_clip model config must be a JSON object.")
    # A Hub `open_clip_config.json` wraps the model config next to its preprocessing config.
    return model_config.get("model_cfg", model_config)


def clip_config_from_open_clip(model_config: dict | str | PathLike) -> CLIPConfig:
    """The transformers `CLIPConfig` of an open_clip model config (a dict, or a JSON file).

    Accepts open_clip's `model_configs/*.json` layout and a Hub `open_clip_config.json` (`{"model_cfg": ...}`).
    """
    config = _normalise_model_config(model_config)
    if "embed_dim" not in config or "vision_cfg" not in config or "text_cfg" not in config:
        raise OpenClipConversionError("open_clip model config needs embed_dim, vision_cfg and text_cfg.")
    if config.get("multimodal_cfg"):
        raise OpenClipConversionError("multimodal_cfg: CoCa models (text decoder) are not CLIP models; not converted.")
    if config.get("init_logit_bias") is not None:
        raise OpenClipConversionError(
            "init_logit_bias is set: a SigLIP-style model (sigmoid loss, logit_bias) has no transformers CLIPModel "
            "counterpart; SigLIP towers are not supported."
        )
    unknown = sorted(set(config) - _TOP_KEYS)
    if unknown:
        raise OpenClipConversionError(
            f"open_clip model config has settings this conversion does not know: {unknown} (audio or other "
            "non-CLIP models are not converted)."
        )
    vision, text = dict(config["vision_cfg"]), dict(config["text_cfg"])

    if vision.get("timm_model_name"):
        raise OpenClipConversionError(
            f"vision_cfg.timm_model_name={vision['timm_model_name']!r}: timm image towers are not open_clip's "
            "VisionTransformer and are not converted."
        )
    if isinstance(vision.get("layers", 12), (list, tuple)):
        raise OpenClipConversionError(
            f"vision_cfg.layers={list(vision['layers'])}: a ModifiedResNet (RN50-style) image tower is not a ViT; "
            "only ViT towers are converted."
        )
    if vision.get("attentional_pool"):
        raise OpenClipConversionError(
            "vision_cfg.attentional_pool is set: the attentional pooler (attn_pool) has no counterpart in "
            "transformers' CLIP, which pools the class token."
        )
    if vision.get("pool_type", "tok") != "tok" or vision.get("global_average_pool"):
        raise OpenClipConversionError(
            f"vision_cfg.pool_type={vision.get('pool_type', 'avg')!r}: transformers' CLIP pools the class token "
            "('tok'); average pooling is not converted."
        )
    if vision.get("no_ln_pre"):
        raise OpenClipConversionError("vision_cfg.no_ln_pre is set: transformers' CLIP always applies pre_layrnorm.")
    if vision.get("input_patchnorm"):
        raise OpenClipConversionError(
            "vision_cfg.input_patchnorm is set: patch LayerNorm is not in transformers' CLIP."
        )

    if text.get("text_arch", "clip") != "clip":
        raise OpenClipConversionError(
            f"text_cfg.text_arch={text['text_arch']!r}: only open_clip's CLIP text transformer is converted."
        )
    if text.get("hf_model_name"):
        raise OpenClipConversionError(
            f"text_cfg.hf_model_name={text['hf_model_name']!r}: Hugging Face text towers (custom text) are not "
            "open_clip's CLIP text transformer and are not converted."
        )
    if text.get("embed_cls"):
        raise OpenClipConversionError("text_cfg.embed_cls is set (CoCa's text CLS token); not converted.")
    if text.get("no_causal_mask"):
        raise OpenClipConversionError(
            "text_cfg.no_causal_mask is set: transformers' CLIP text tower is always causal."
        )
    if text.get("proj_bias") or text.get("proj_type", "linear") != "linear":
        raise OpenClipConversionError(
            f"text_cfg proj_type={text.get('proj_type', 'linear')!r}, proj_bias={bool(text.get('proj_bias'))}: "
            "transformers' CLIP text projection is one bias-free linear map."
        )
    # After the named refusals, so that a timm or modern tower is named as such rather than by an unknown key.
    _refuse_common(vision, "vision_cfg", _VISION_KEYS)
    _refuse_common(text, "text_cfg", _TEXT_KEYS)
    pool_type = text.get("pool_type", "argmax")
    if pool_type == "argmax":
        eos_token_id = ARGMAX_POOLING_EOS_ID
    elif pool_type == "eos" and text.get("eos_id") is not None and text["eos_id"] != ARGMAX_POOLING_EOS_ID:
        eos_token_id = int(text["eos_id"])  # transformers pools at the first `eos_token_id`, as open_clip's 'eos'
    else:
        raise OpenClipConversionError(
            f"text_cfg.pool_type={pool_type!r} (eos_id={text.get('eos_id')}): transformers' CLIP text tower pools "
            "at the argmax token or at the first eos_token_id (not 2); this pooling is not converted."
        )

    width = int(vision.get("width", 768))
    head_width = int(vision.get("head_width", 64))
    if width % head_width:
        raise OpenClipConversionError(f"vision_cfg.width={width} is not a multiple of head_width={head_width}.")
    text_width, text_heads = int(text.get("width", 512)), int(text.get("heads", 8))
    if text_width % text_heads:
        raise OpenClipConversionError(f"text_cfg.width={text_width} is not a multiple of heads={text_heads}.")
    hidden_act = "quick_gelu" if config.get("quick_gelu", False) else "gelu"  # open_clip: QuickGELU else nn.GELU
    embed_dim = int(config["embed_dim"])
    vision_config = dict(
        hidden_size=width,
        intermediate_size=int(width * float(vision.get("mlp_ratio", 4.0))),
        num_hidden_layers=int(vision.get("layers", 12)),
        num_attention_heads=width // head_width,
        image_size=_pair(vision.get("image_size", 224), "image_size"),
        patch_size=_pair(vision.get("patch_size", 16), "patch_size"),
        num_channels=3,
        hidden_act=hidden_act,
        layer_norm_eps=_layer_norm_eps(vision, "vision_cfg"),
        projection_dim=embed_dim,
    )
    text_config = dict(
        vocab_size=int(text.get("vocab_size", CLIP_VOCAB_SIZE)),
        hidden_size=text_width,
        intermediate_size=int(text_width * float(text.get("mlp_ratio", 4.0))),
        num_hidden_layers=int(text.get("layers", 12)),
        num_attention_heads=text_heads,
        max_position_embeddings=int(text.get("context_length", 77)),
        hidden_act=hidden_act,
        layer_norm_eps=_layer_norm_eps(text, "text_cfg"),
        projection_dim=embed_dim,
        eos_token_id=eos_token_id,
        pad_token_id=int(text.get("pad_id", 0)),
    )
    if text.get("bos_id") is not None:
        text_config["bos_token_id"] = int(text["bos_id"])
    return CLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=embed_dim,
        logit_scale_init_value=float(config.get("init_logit_scale", 2.6592)),
    )


def _strip_wrappers(state_dict: dict) -> dict:
    """open_clip training checkpoints: `{"state_dict": ...}` and a DDP `module.` prefix (as open_clip unwraps)."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    # CustomTextCLIP keeps the same text transformer under `text.`.
    return {
        (key[len("text.") :] if key.startswith("text.") and key[5:].startswith(_TEXT_TOWER_PREFIXES) else key): value
        for key, value in state_dict.items()
    }


def _resblock_names(source: str, target: str, index: int) -> dict[str, str]:
    """transformers name -> open_clip name for one residual block (the fused in_proj is handled separately)."""
    names = {}
    for ours, theirs in (
        ("layer_norm1", "ln_1"),
        ("self_attn.out_proj", "attn.out_proj"),
        ("layer_norm2", "ln_2"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
    ):
        for kind in ("weight", "bias"):
            names[f"{target}.encoder.layers.{index}.{ours}.{kind}"] = f"{source}.resblocks.{index}.{theirs}.{kind}"
    return names


def clip_state_dict_from_open_clip(state_dict: dict, config: CLIPConfig) -> dict[str, torch.Tensor]:
    """open_clip's `CLIP` state dict in transformers `CLIPModel` names, split and transposed; checked complete.

    Any open_clip weight left over (e.g. `visual.attn_pool.*`, `ls_1.gamma`, `logit_bias`) is an error naming it,
    as is a missing one.
    """
    source = _strip_wrappers(dict(state_dict))
    used = set(_IGNORED_KEYS)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in source:
            raise OpenClipConversionError(f"open_clip state dict lacks {name!r} (needed for this config).")
        used.add(name)
        return source[name]

    renames = {
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    towers = (
        ("visual.transformer", "vision_model", config.vision_config.num_hidden_layers),
        ("transformer", "text_model", config.text_config.num_hidden_layers),
    )
    for prefix, target, layers in towers:
        for index in range(layers):
            renames.update(_resblock_names(prefix, target, index))
            # open_clip (like nn.MultiheadAttention) stacks q, k, v along the output dimension of in_proj.
            for kind in ("weight", "bias"):
                fused = take(f"{prefix}.resblocks.{index}.attn.in_proj_{kind}")
                if fused.shape[0] % 3:
                    raise OpenClipConversionError(
                        f"{prefix}.resblocks.{index}.attn.in_proj_{kind} has {fused.shape[0]} rows, not 3 x width."
                    )
                for part, chunk in zip(("q", "k", "v"), fused.chunk(3, dim=0)):
                    out[f"{target}.encoder.layers.{index}.self_attn.{part}_proj.{kind}"] = chunk.clone()
    for ours, theirs in renames.items():
        out[ours] = take(theirs)
    # open_clip applies `x @ proj` with proj [width, embed_dim]; nn.Linear stores the transpose.
    out["visual_projection.weight"] = take("visual.proj").t().contiguous()
    out["text_projection.weight"] = take("text_projection").t().contiguous()
    out["logit_scale"] = take("logit_scale").reshape(())  # open_clip's nonscalar_logit_scale stores shape [1]

    left = sorted(set(source) - used)
    if left:
        hint = ""
        if any(".attn_pool" in key for key in left):
            hint = " (attn_pool: attentional pooling has no counterpart in transformers' CLIP)"
        elif any(".ls_1." in key or ".ls_2." in key for key in left):
            hint = " (ls_1/ls_2: layer scale has no counterpart in transformers' CLIP)"
        elif "logit_bias" in left:
            hint = " (logit_bias: SigLIP-style models are not supported)"
        elif any(key.startswith("visual.trunk.") for key in left):
            hint = " (visual.trunk: a timm image tower, not open_clip's ViT)"
        raise OpenClipConversionError(
            f"open_clip state dict has {len(left)} weights a transformers CLIPModel cannot hold{hint}: {left[:8]}."
        )
    return out


def from_open_clip(
    state_dict: dict, model_config: dict | str | PathLike, dtype: torch.dtype | None = None
) -> CLIPModel:
    """A transformers `CLIPModel` equal to an open_clip `CLIP`, from its state dict and open_clip model config.

    `state_dict` is what `torch.load(..., weights_only=True)` or safetensors give for an open_clip checkpoint
    (`{"state_dict": ...}` and a `module.` prefix are unwrapped). Weights keep float32 unless `dtype` is given.
    """
    config = clip_config_from_open_clip(model_config)
    weights = clip_state_dict_from_open_clip(state_dict, config)
    model = CLIPModel(config)
    expected = model.state_dict()
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise OpenClipConversionError(
                f"open_clip weight for {name} has shape {tuple(tensor.shape)}, but the model config gives "
                f"{tuple(expected[name].shape)}; the config does not describe this checkpoint."
            )
    model.load_state_dict(weights, strict=True)
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model.eval()


def occlip_from_open_clip(state_dict: dict, model_config, binding_config: dict | None = None, **config_kwargs):
    """`OCCLIPModel.from_clip` on the converted open_clip model (new binding module, CLIP towers kept)."""
    from modeling_occlip import OCCLIPModel

    return OCCLIPModel.from_clip(from_open_clip(state_dict, model_config), binding_config, **config_kwargs)


def cloc_from_open_clip(state_dict: dict, model_config, prompter_config: dict | None = None, **config_kwargs):
    """`CLOCModel.from_clip` on the converted open_clip model (new Prompter, CLIP towers kept)."""
    from modeling_cloc import CLOCModel

    return CLOCModel.from_clip(from_open_clip(state_dict, model_config), prompter_config, **config_kwargs)


def load_open_clip_state_dict(path: str | PathLike) -> dict[str, torch.Tensor]:
    """An open_clip checkpoint file's tensors: `.safetensors`, or a torch file loaded with `weights_only=True`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    # weights_only: a pickled checkpoint runs no code on load; a checkpoint that needs more is refused by torch.
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise OpenClipConversionError(f"{path} holds a {type(checkpoint).__name__}, not a state dict.")
    return _strip_wrappers(checkpoint)


def open_clip_processor(model_config: dict | str | PathLike, preprocess_cfg: dict | None = None) -> CLIPProcessor:
    """A `CLIPProcessor` matching open_clip's default preprocessing and tokenizer for this config.

    Images: resize the shortest side (bicubic) and centre-crop to `image_size`, with `preprocess_cfg`'s mean/std
    (OpenAI's by default), as open_clip's `resize_mode='shortest'`. Text: the bundled OpenAI CLIP BPE tokenizer at
    the config's context length. Configs with another tokenizer or resize mode are refused.
    """
    raw = model_config
    if not isinstance(raw, dict):
        with open(raw) as handle:
            raw = json.load(handle)
    if preprocess_cfg is None:
        preprocess_cfg = raw.get("preprocess_cfg", {}) if isinstance(raw, dict) else {}
    config = _normalise_model_config(raw)
    text = config.get("text_cfg", {})
    if (
        text.get("hf_tokenizer_name")
        or text.get("tokenizer_type")
        or text.get("vocab_size", CLIP_VOCAB_SIZE) != (CLIP_VOCAB_SIZE)
    ):
        raise OpenClipConversionError(
            "this model uses a tokenizer other than OpenAI CLIP's BPE (hf_tokenizer_name / tokenizer_type / "
            "vocab_size); save its tokenizer yourself."
        )
    resize_mode = preprocess_cfg.get("resize_mode", "shortest")
    if resize_mode != "shortest":
        raise OpenClipConversionError(
            f"preprocess_cfg.resize_mode={resize_mode!r}: only 'shortest' (resize + centre crop) maps onto "
            "CLIPImageProcessor."
        )
    size = _pair(config["vision_cfg"].get("image_size", 224), "image_size")
    resample = {"bicubic": 3, "bilinear": 2}.get(preprocess_cfg.get("interpolation", "bicubic"))
    if resample is None:
        raise OpenClipConversionError(
            f"preprocess_cfg.interpolation={preprocess_cfg['interpolation']!r} not supported."
        )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=resample,
        image_mean=list(preprocess_cfg.get("mean", OPENAI_DATASET_MEAN)),
        image_std=list(preprocess_cfg.get("std", OPENAI_DATASET_STD)),
    )
    tokenizer = bundled_clip_tokenizer(model_max_length=int(text.get("context_length", 77)))
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
