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
            `forward(..., boxes=...)` returns region hidden states and embeddings (Ferret-style region inputs).
            Loading the config from a full CLOC folder fills it in (and `projection_dim`) from the CLOC config.
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

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """As `PreTrainedConfig`, but reading a full CLOC config also hands the Prompter to the vision tower."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        vision = config_dict.get(cls.base_config_key)
        if config_dict.get("model_type") == "cloc" and isinstance(vision, dict):
            prompter = config_dict.get("prompter_config") or {}
            vision = {**vision, "prompter_config": prompter, "projection_dim": config_dict.get("projection_dim", 512)}
            config_dict = {**config_dict, cls.base_config_key: vision}
        return config_dict, kwargs


@strict
class CLOCPrompterConfig(PreTrainedConfig):
    r"""The Prompter and box head of CLOC (spec `cloc.md` §2, §9).

    Args:
        num_hidden_layers (`int`, defaults to 1): transformer layers over `[prompt tokens ; image tokens]`.
        num_attention_heads (`int`, defaults to 1): heads of those layers (the paper: one).
        mlp_ratio (`float`, defaults to 4.0): MLP width as a multiple of the vision width.
        pooling (`str`, defaults to `"prompt"`): mean over the prompt-token outputs, or `"all"` tokens.
        box_pe_temperature (`float`, defaults to 10000): base of the sinusoidal corner encoding.
        box_corner_embeddings (`bool`, defaults to `True`): add learned top-left / bottom-right type embeddings.
        box_head_hidden (`int`, *optional*): hidden width of the grounding MLP (default: the vision width).
        hidden_act (`str`, defaults to `"gelu"`), layer_norm_eps (`float`), initializer_range (`float`).
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
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Reject Prompter settings that cannot build a model (raises `ValueError`)."""
        if self.num_hidden_layers < 1 or self.num_attention_heads < 1:
            raise ValueError("prompter_config needs num_hidden_layers >= 1 and num_attention_heads >= 1")
        if self.pooling not in ("prompt", "all"):
            raise ValueError(f"prompter_config.pooling must be 'prompt' or 'all', got {self.pooling!r}")


@strict
class CLOCConfig(PreTrainedConfig):
    r"""Configuration of [`CLOCModel`]. `CLOCConfig()` is a ViT-B/16 CLIP with a one-layer, one-head Prompter.

    Args:
        text_config, vision_config, prompter_config: sub-configs (dicts or config objects).
        projection_dim (`int`, defaults to 512): joint embedding width (both towers' `projection_dim`).
        logit_scale_init_value / region_logit_scale_init_value (`float`, ln(1/0.07)): image-text and region-text
            log temperatures (separate parameters); `exp` of either is clamped at `logit_scale_max`.
        region_loss_weight (`float`, defaults to 1.0): lambda before scaling by the fraction of images with regions.
        region_text_filter_threshold (`float`, defaults to 0.9): region-text negatives whose caption embeddings
            have cosine above this are removed from the softmax (no gradient).
        grounding_unique_only (`bool`, defaults to `True`): box regression only for captions unique in their image.
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
    region_text_filter_threshold: float = 0.9
    grounding_unique_only: bool = True
    region_head: str = "prompter"
    roi_align_samples: int = 7
    initializer_factor: float = 1.0

    def __post_init__(self, **kwargs):
        for key in ("text_config", "vision_config"):
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, {k: v for k, v in value.items() if k not in ("model_type", "transformers_version")})
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Reject sub-configs whose widths do not fit together (raises `ValueError`)."""
        for name in ("text_config", "vision_config"):
            sub = getattr(self, name)
            if sub is not None and sub.projection_dim is not None and sub.projection_dim != self.projection_dim:
                raise ValueError(
                    f"{name}.projection_dim ({sub.projection_dim}) does not match projection_dim "
                    f"({self.projection_dim})."
                )
        if self.region_head not in ("prompter", "roi_align"):
            raise ValueError(f"region_head must be 'prompter' or 'roi_align', got {self.region_head!r}")
        if self.roi_align_samples < 1:
            raise ValueError(f"roi_align_samples must be >= 1, got {self.roi_align_samples}")
        vision, prompter = self.vision_config, self.prompter_config
        if vision is not None and prompter is not None:
            if vision.hidden_size % 4 != 0:
                raise ValueError(f"vision_config.hidden_size ({vision.hidden_size}) must be a multiple of 4 (box PE)")
            if vision.hidden_size % prompter.num_attention_heads != 0:
                raise ValueError(
                    f"vision width {vision.hidden_size} is not a multiple of prompter_config.num_attention_heads "
                    f"({prompter.num_attention_heads})."
                )


__all__ = ["CLOCConfig", "CLOCPrompterConfig", "CLOCTextConfig", "CLOCVisionConfig"]
