"""CLOC configuration: CLIP-compatible towers plus the Prompter (region embeddings from box or text prompts)."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.models.clip.configuration_clip import CLIPTextConfig, CLIPVisionConfig


@strict
class CLOCTextConfig(CLIPTextConfig):
    """Text tower of CLOC; the same fields (and weights) as transformers' `CLIPTextConfig`."""

    model_type = "cloc_text_model"
    base_config_key = "text_config"


@strict
class CLOCVisionConfig(CLIPVisionConfig):
    r"""Vision tower of CLOC; the same fields (and weights) as `CLIPVisionConfig`, ViT-B/16 at 224 px by default.

    Args:
        prompter_config (`dict`, *optional*): when set, `CLOCVisionModel` also holds the Prompter and its
            `forward(..., input_boxes=...)` returns region hidden states and embeddings (Ferret-style region inputs).
            `CLOCVisionConfig.from_pretrained(cloc_folder)` is the full config's `vision_config` as it stands (no
            Prompter); `CLOCVisionModel.from_pretrained(cloc_folder)` adds the Prompter (`with_prompter`).
    """

    model_type = "cloc_vision_model"
    base_config_key = "vision_config"

    patch_size: int | list[int] | tuple[int, int] | None = 16
    prompter_config: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.prompter_config is not None:
            self.prompter_config = self.build_prompter_config().to_diff_dict()
            self.prompter_config.pop("transformers_version", None)
            heads = self.prompter_config.get("num_attention_heads", 1)
            if self.hidden_size % 4 != 0 or self.hidden_size % heads != 0:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of 4 (box PE) and of "
                    f"prompter_config.num_attention_heads ({heads})."
                )

    def build_prompter_config(self) -> "CLOCPrompterConfig | None":
        """`prompter_config` as a validated `CLOCPrompterConfig` (None when this tower has no Prompter)."""
        if self.prompter_config is None:
            return None
        fields = {k: v for k, v in self.prompter_config.items() if k not in ("model_type", "transformers_version")}
        return CLOCPrompterConfig(**fields)

    def with_prompter(self, prompter_config: dict | None, projection_dim: int) -> "CLOCVisionConfig":
        """A copy of this config that also holds a Prompter (`prompter_config`, `{}` for the defaults) projecting to
        `projection_dim`: what `CLOCVisionModel.from_pretrained(cloc_folder)` builds from a full CLOC config."""
        fields = {k: v for k, v in self.to_dict().items() if k not in ("model_type", "transformers_version")}
        fields.update(prompter_config=dict(prompter_config or {}), projection_dim=projection_dim)
        return type(self)(**fields)


@strict
class CLOCPrompterConfig(PreTrainedConfig):
    r"""The Prompter and box head of CLOC (`docs/cloc.md` §2, §9).

    Args:
        num_hidden_layers (`int`, defaults to 1): transformer layers over `[prompt tokens ; image tokens]`.
        num_attention_heads (`int`, defaults to 1): heads of those layers (the paper: one).
        mlp_ratio (`float`, defaults to 4.0): MLP width as a multiple of the vision width.
        pooling (`str`, defaults to `"prompt"`): mean over the prompt-token outputs, or `"all"` tokens.
        box_pe_temperature (`float`, defaults to 10000): base of the sinusoidal corner encoding.
        box_corner_embeddings (`bool`, defaults to `True`): add learned top-left / bottom-right type embeddings.
        box_head_hidden (`int`, *optional*): hidden width of the grounding MLP (default: the vision width).
        vision_feature_layer (`int`, defaults to -1): index into the vision tower's hidden states (embeddings = 0)
            of the image tokens the Prompter (and the RoI head) reads; -1 is the last layer before the post-LN.
            In small towers trained as CLIP the last layer's patch tokens mix the whole image, which blurs regions.
        position_frequencies (`int`, defaults to 0): patch positions added to the image tokens' keys and values
            (after the layer norm): each patch centre `(x, y)` in [-1, 1] plus `sin/cos(pi k x|y)`, k = 1..F,
            through a learned linear map; the CLS token gets none. Values that carry position let a text prompt's
            output (and so the box head) know where it attended; `-1` adds none, as in the paper's description.
        box_attention_bias (`float`, defaults to 10.0): initial value of a learned scale `b`; a box prompt's
            attention logit to a patch gets `+ b * (fraction of the patch covered by the box)`, so box prompts
            read their box from the first step (measured: without it 97% of the attention went to CLS; region
            classification 0.55 at b = 4 vs 0.74 at b = 10 on the synthetic benchmark). 0 builds no such term.
        hidden_act (`str`, defaults to `"gelu"`), layer_norm_eps (`float`).
        initializer_range (`float`, *optional*): standard deviation of the Prompter and box head weights at
            initialisation. Default `1.7 / sqrt(width)`: attention logits then start with a spread of about 3
            whatever the width, so prompts compete for patches from the first step. Measured on the synthetic
            benchmark (width 128): at 0.02 the attention stays near uniform for hundreds of steps and grounding
            stays at chance (IoU > 0.5 for 0.04 of boxes after 300 steps vs 0.75 at 0.15).
    """

    model_type = "cloc_prompter"
    base_config_key = "prompter_config"

    num_hidden_layers: int = 1
    num_attention_heads: int = 1
    mlp_ratio: float = 4.0
    pooling: str = "prompt"
    box_pe_temperature: float = 10000.0
    box_corner_embeddings: bool = True
    box_head_hidden: int | None = None
    vision_feature_layer: int = -1
    position_frequencies: int = 0
    box_attention_bias: float = 10.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def initializer_std(self, width: int) -> float:
        """`initializer_range`, or its default `1.7 / sqrt(width)` for a Prompter `width` wide."""
        return self.initializer_range if self.initializer_range is not None else 1.7 * width**-0.5

    def validate_architecture(self):
        """Reject Prompter settings that cannot build a model (raises `ValueError`)."""
        if self.num_hidden_layers < 1 or self.num_attention_heads < 1:
            raise ValueError("prompter_config needs num_hidden_layers >= 1 and num_attention_heads >= 1")
        if self.position_frequencies < -1:
            raise ValueError(
                f"prompter_config.position_frequencies must be -1 (none) or >= 0, got {self.position_frequencies}"
            )
        if self.pooling not in ("prompt", "all"):
            raise ValueError(f"prompter_config.pooling must be 'prompt' or 'all', got {self.pooling!r}")


# The same function stands in modeling_occlip/configuration_occlip.py: each model folder must work alone as remote code.
def _own_sub_config_types(config: PreTrainedConfig) -> None:
    """Tower sub-configs given as dicts lose `model_type` (and `transformers_version`): a dict taken from a CLIP
    config carries CLIP's model type, and this model's own sub-config classes apply."""
    for key in ("text_config", "vision_config"):
        value = getattr(config, key)
        if isinstance(value, dict):
            setattr(config, key, {k: v for k, v in value.items() if k not in ("model_type", "transformers_version")})


# The same function stands in modeling_occlip/configuration_occlip.py: each model folder must work alone as remote code.
def _check_projection_dims(config: PreTrainedConfig) -> None:
    """Both towers' `projection_dim` (where set) must equal the model's (raises `ValueError`)."""
    for name in ("text_config", "vision_config"):
        sub = getattr(config, name)
        if sub is not None and sub.projection_dim is not None and sub.projection_dim != config.projection_dim:
            raise ValueError(
                f"{name}.projection_dim ({sub.projection_dim}) does not match projection_dim "
                f"({config.projection_dim}); the text and image projections must map to the same joint space."
            )


@strict
class CLOCConfig(PreTrainedConfig):
    r"""Configuration of [`CLOCModel`]. `CLOCConfig()` is a ViT-B/16 CLIP with a one-layer, one-head Prompter.

    Args:
        text_config, vision_config, prompter_config: sub-configs (dicts or config objects).
        projection_dim (`int`, defaults to 512): joint embedding width (both towers' `projection_dim`).
        logit_scale_init_value / region_logit_scale_init_value (`float`, ln(1/0.07)): image-text and region-text
            log temperatures (separate parameters); `exp` of either is clamped at `logit_scale_max`.
        region_loss_weight (`float`, defaults to 1.0): lambda before scaling by the fraction of images with regions.
        region_text_filter (`str`, defaults to `"exact"`): which region-text negatives are near-duplicates of a
            region's own caption and leave the softmax (no gradient): `"exact"`, captions with identical tokens
            (independent of the model being trained), or `"cosine"` (the paper), caption embeddings of the model's
            own text tower with cosine above `region_text_filter_threshold`. On a weak text tower the cosine filter
            removes real negatives ("red circle" vs "red square" at 0.99), so the loss never asks for shape.
        region_text_filter_threshold (`float`, defaults to 0.9): the threshold of the `"cosine"` filter.
        grounding_loss (`str`, defaults to `"mse"`): the box regression loss, mean over the 4 coordinates:
            `"mse"` (squared error, the spec's reading of the paper) or `"l1"` (absolute error, whose gradient does
            not vanish as boxes get close, so boxes keep sharpening).
        grounding_unique_only (`bool`, defaults to `True`): box regression only for captions unique in their image.
        grounding_attention_loss_weight (`float`, defaults to 0.0): weight w of a term `-log` (share of a region
            caption's text-prompt attention over the image patches that falls inside its box), over the grounding
            targets. It supervises where grounding looks, not only the box it outputs: with small patches (4 px
            on 64 px images) the text prompt otherwise spreads its attention (0.23 of it inside the box) and the
            box head never leaves the mean box (see the README's ablations). Needs a one-layer Prompter.
        region_head (`str`, defaults to `"prompter"`): how boxes become region embeddings: the Prompter, or
            `"roi_align"` (the paper's ablation: `roi_align_samples`² bilinear samples on the patch grid, mean, LN,
            projection). Grounding always uses the Prompter's text path.
        roi_align_samples (`int`, defaults to 7): samples per box side for `"roi_align"`.
    """

    model_type = "cloc"
    sub_configs_defaults = {
        "text_config": CLOCTextConfig,
        "vision_config": CLOCVisionConfig,
        "prompter_config": CLOCPrompterConfig,
    }

    text_config: dict | CLOCTextConfig | None = None
    vision_config: dict | CLOCVisionConfig | None = None
    prompter_config: dict | CLOCPrompterConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    region_logit_scale_init_value: float = 2.6592
    logit_scale_max: float = 100.0
    region_loss_weight: float = 1.0
    region_text_filter: str = "exact"
    region_text_filter_threshold: float = 0.9
    grounding_loss: str = "mse"
    grounding_unique_only: bool = True
    grounding_attention_loss_weight: float = 0.0
    region_head: str = "prompter"
    roi_align_samples: int = 7
    initializer_factor: float = 1.0

    def __post_init__(self, **kwargs):
        _own_sub_config_types(self)
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Reject sub-configs whose widths do not fit together (raises `ValueError`)."""
        _check_projection_dims(self)
        if self.grounding_loss not in ("mse", "l1"):
            raise ValueError(f"grounding_loss must be 'mse' or 'l1', got {self.grounding_loss!r}")
        if self.region_text_filter not in ("exact", "cosine"):
            raise ValueError(f"region_text_filter must be 'exact' or 'cosine', got {self.region_text_filter!r}")
        if self.region_head not in ("prompter", "roi_align"):
            raise ValueError(f"region_head must be 'prompter' or 'roi_align', got {self.region_head!r}")
        if self.roi_align_samples < 1:
            raise ValueError(f"roi_align_samples must be >= 1, got {self.roi_align_samples}")
        vision, prompter = self.vision_config, self.prompter_config
        if not self.grounding_attention_loss_weight >= 0 or self.grounding_attention_loss_weight == float("inf"):
            raise ValueError(
                f"grounding_attention_loss_weight must be finite and >= 0, got {self.grounding_attention_loss_weight}"
            )
        if self.grounding_attention_loss_weight > 0 and prompter is not None and prompter.num_hidden_layers != 1:
            raise ValueError(
                "grounding_attention_loss_weight > 0 supervises the attention of a one-layer Prompter; "
                f"prompter_config.num_hidden_layers is {prompter.num_hidden_layers}"
            )
        if vision is not None and prompter is not None:
            if vision.hidden_size % 4 != 0:
                raise ValueError(f"vision_config.hidden_size ({vision.hidden_size}) must be a multiple of 4 (box PE)")
            if vision.hidden_size % prompter.num_attention_heads != 0:
                raise ValueError(
                    f"vision width {vision.hidden_size} is not a multiple of prompter_config.num_attention_heads "
                    f"({prompter.num_attention_heads})."
                )


__all__ = ["CLOCConfig", "CLOCPrompterConfig", "CLOCTextConfig", "CLOCVisionConfig"]
