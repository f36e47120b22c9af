"""OC-CLIP configuration: CLIP-compatible text and vision towers plus the binding module and structured score."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.models.clip.configuration_clip import CLIPTextConfig, CLIPVisionConfig


@strict
class OCCLIPTextConfig(CLIPTextConfig):
    """Text tower of OC-CLIP; the same fields (and weights) as transformers' `CLIPTextConfig`.

    Node phrases ("red cube") and predicates ("left of") are each encoded as a separate short sequence.
    """

    model_type = "occlip_text_model"
    base_config_key = "text_config"


@strict
class OCCLIPVisionConfig(CLIPVisionConfig):
    """Vision tower of OC-CLIP; the same fields (and weights) as transformers' `CLIPVisionConfig`.

    Defaults are ViT-B/16 at 224 px, the paper's backbone. Also the config of the standalone
    `OCCLIPVisionModel` (the fine-tuned image tower as a vision backbone).
    """

    model_type = "occlip_vision_model"
    base_config_key = "vision_config"

    patch_size: int | list[int] | tuple[int, int] | None = 16


@strict
class OCCLIPBindingConfig(PreTrainedConfig):
    r"""Binding module and structured similarity of OC-CLIP (`docs/occlip.md` §2.1, §2.2, §8).

    Args:
        hidden_size (`int`, *optional*):
            Binding width `d`. `None` takes the vision tower's width (resolved by `OCCLIPConfig`).
        num_hidden_layers (`int`, defaults to 2):
            Binding layers `L`; each is one query-competitive cross-attention plus an MLP.
        num_attention_heads (`int`, defaults to 1):
            Heads of the binding attention; with more than one, queries compete per head.
        mlp_ratio (`float`, defaults to 4.0):
            Hidden width of the slot MLP as a multiple of `hidden_size`.
        num_default_queries (`int`, defaults to 4):
            Learned queries appended to the node queries to absorb unmentioned content; dropped after binding.
        vision_feature_layer (`int`, defaults to -1):
            Index into the vision tower's hidden states (embeddings = 0) whose patch tokens feed the binding;
            the CLS token is dropped.
        position_frequencies (`int`, defaults to 0):
            Patch positions added to the binding input (after its layer norm, so they reach every layer's keys
            and values): the patch centre `(x, y)` in [-1, 1] plus `sin/cos(pi k x)`, `sin/cos(pi k y)` for
            `k = 1..position_frequencies`, through a learned linear map. A slot is a weighted mean of values, so it
            then carries the centroid of what its node attended to, which spatial relations need. `-1` adds no
            position (the slots then know only what the last-layer tokens still encode of it).
        renormalize (`bool`, defaults to `True`):
            Renormalise the query-softmax attention over patches (`w = a / (sum_patches a + eps)`).
        eps (`float`, defaults to 1e-8):
            The `eps` of that renormalisation.
        slot_residual_from_query (`bool`, defaults to `False`):
            Start slots from the query text instead of zero. Off, the text only steers attention.
        object_score_dim (`int`, defaults to 256):
            Width of the object-term projections `U_n`, `U_s`.
        relation_score_dim (`int`, defaults to 256):
            Width of the relation-term projections `U_r`, `f_s`, `f_o`.
        score_weight_init (`float`, defaults to 1.0):
            Initial value of the positive weights alpha (objects) and beta (relations), stored as logs.
        hidden_act (`str`, defaults to `"gelu"`):
            Activation of the slot MLP and the relation MLPs.
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the binding layer norms.
        initializer_range (`float`, *optional*): standard deviation of the binding and scoring weights at
            initialisation. Default `1.7 / sqrt(width)`: attention logits then start with a spread of about 3
            whatever the width, so node queries compete for patches from the first step. Measured on the synthetic
            benchmark (width 128): at 0.02 the attention stays near uniform for hundreds of steps and binding
            never forms (attribute swap 0.65 after 300 steps vs 1.0 at 1.7 / sqrt(128) = 0.15).
    """

    model_type = "occlip_binding"
    base_config_key = "binding_config"

    hidden_size: int | None = None
    num_hidden_layers: int = 2
    num_attention_heads: int = 1
    mlp_ratio: float = 4.0
    num_default_queries: int = 4
    vision_feature_layer: int = -1
    position_frequencies: int = 0
    renormalize: bool = True
    eps: float = 1e-8
    slot_residual_from_query: bool = False
    object_score_dim: int = 256
    relation_score_dim: int = 256
    score_weight_init: float = 1.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    initializer_range: float | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Checked here, not only in `validate_architecture`, so that users get a plain ValueError.
        self.validate_architecture()

    def initializer_std(self, width: int) -> float:
        """`initializer_range`, or its default `1.7 / sqrt(width)` for a binding module `width` wide."""
        return self.initializer_range if self.initializer_range is not None else 1.7 * width**-0.5

    def validate_architecture(self):
        """Reject binding settings that cannot build a model (raises `ValueError`)."""
        if self.num_hidden_layers < 1:
            raise ValueError(f"binding_config.num_hidden_layers must be >= 1, got {self.num_hidden_layers}.")
        if self.num_attention_heads < 1:
            raise ValueError(f"binding_config.num_attention_heads must be >= 1, got {self.num_attention_heads}.")
        if self.hidden_size is not None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"binding_config.hidden_size ({self.hidden_size}) is not a multiple of "
                f"binding_config.num_attention_heads ({self.num_attention_heads})."
            )
        if self.num_default_queries < 0:
            raise ValueError(f"binding_config.num_default_queries must be >= 0, got {self.num_default_queries}.")
        if self.score_weight_init <= 0:
            raise ValueError(f"binding_config.score_weight_init must be > 0, got {self.score_weight_init}.")
        if self.position_frequencies < -1:
            raise ValueError(
                f"binding_config.position_frequencies must be -1 (no position) or >= 0, got {self.position_frequencies}."
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"binding_config.mlp_ratio must be > 0, got {self.mlp_ratio}.")


# The same function stands in modeling_cloc/configuration_cloc.py: each model folder must work alone as remote code.
def _own_sub_config_types(config: PreTrainedConfig) -> None:
    """Tower sub-configs given as dicts lose `model_type` (and `transformers_version`): a dict taken from a CLIP
    config carries CLIP's model type, and this model's own sub-config classes apply."""
    for key in ("text_config", "vision_config"):
        value = getattr(config, key)
        if isinstance(value, dict):
            setattr(config, key, {k: v for k, v in value.items() if k not in ("model_type", "transformers_version")})


# The same function stands in modeling_cloc/configuration_cloc.py: each model folder must work alone as remote code.
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
class OCCLIPConfig(PreTrainedConfig):
    r"""Configuration of [`OCCLIPModel`]: text, vision and binding sub-configs plus loss and scoring options.

    A default-constructed `OCCLIPConfig()` is a ViT-B/16 image tower, a CLIP-B text tower (width 512) and a
    768-wide, 2-layer binding module.

    Args:
        text_config (`dict` or `OCCLIPTextConfig`, *optional*): the text tower.
        vision_config (`dict` or `OCCLIPVisionConfig`, *optional*): the vision tower.
        binding_config (`dict` or `OCCLIPBindingConfig`, *optional*): binding module and structured score.
        projection_dim (`int`, defaults to 512):
            Joint embedding width of the CLIP projections; must equal both towers' `projection_dim`.
        logit_scale_init_value (`float`, defaults to ln(1/0.07)):
            Initial log temperature `t` of the structured logits `z = exp(t) * s`.
        logit_scale_max (`float`, defaults to 100.0): `exp(t)` is clamped to this value.
        text_embedding_source (`str`, defaults to `"projected"`):
            Node/predicate embedding: `"projected"` (pooled EOT + text projection) or `"pooled"` (pooled EOT).
        rel_loss_weight (`float`, defaults to 1.0): weight of the local graph contrastive loss `L_rel`.
        rel_num_swap_negatives (`int`, defaults to 4):
            Negative graphs per caption that swap one relation's subject and object (first relations first).
        rel_num_reassign_negatives (`int`, defaults to 2):
            Negative graphs per caption whose relations are moved to other nodes (cyclic shifts of the nodes).
        pair_chunk_size (`int`, defaults to 4096): image-caption pairs bound per chunk when scoring all pairs.
    """

    model_type = "occlip"
    sub_configs_defaults = {
        "text_config": OCCLIPTextConfig,
        "vision_config": OCCLIPVisionConfig,
        "binding_config": OCCLIPBindingConfig,
    }

    text_config: dict | OCCLIPTextConfig | None = None
    vision_config: dict | OCCLIPVisionConfig | None = None
    binding_config: dict | OCCLIPBindingConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    logit_scale_max: float = 100.0
    text_embedding_source: str = "projected"
    rel_loss_weight: float = 1.0
    rel_num_swap_negatives: int = 4
    rel_num_reassign_negatives: int = 2
    pair_chunk_size: int = 4096
    initializer_factor: float = 1.0

    def __post_init__(self, **kwargs):
        _own_sub_config_types(self)
        super().__post_init__(**kwargs)
        if self.binding_config.hidden_size is None:
            self.binding_config.hidden_size = self.vision_config.hidden_size
        self.validate_architecture()

    @property
    def binding_width(self) -> int:
        """Width `d` of the binding slots."""
        return self.binding_config.hidden_size or self.vision_config.hidden_size

    @property
    def text_embed_dim(self) -> int:
        """Width `D_e` of node and predicate embeddings."""
        if self.text_embedding_source == "projected":
            return self.projection_dim
        return self.text_config.hidden_size

    def validate_architecture(self):
        """Reject sub-configs whose widths do not fit together (raises `ValueError`)."""
        if self.text_embedding_source not in ("projected", "pooled"):
            raise ValueError(
                f"text_embedding_source must be 'projected' or 'pooled', got {self.text_embedding_source!r}."
            )
        _check_projection_dims(self)
        binding = self.binding_config
        vision = self.vision_config
        if binding is not None and vision is not None:
            width = binding.hidden_size or vision.hidden_size
            if width % binding.num_attention_heads != 0:
                raise ValueError(
                    f"binding width {width} is not a multiple of binding_config.num_attention_heads "
                    f"({binding.num_attention_heads})."
                )
            num_layers = vision.num_hidden_layers
            if not -(num_layers + 1) <= binding.vision_feature_layer <= num_layers:
                raise ValueError(
                    f"binding_config.vision_feature_layer={binding.vision_feature_layer} is outside the vision "
                    f"tower's {num_layers + 1} hidden states."
                )
        if self.rel_num_swap_negatives < 0 or self.rel_num_reassign_negatives < 0:
            raise ValueError("rel_num_swap_negatives and rel_num_reassign_negatives must be >= 0.")
        if self.pair_chunk_size < 1:
            raise ValueError(f"pair_chunk_size must be >= 1, got {self.pair_chunk_size}.")
        if self.logit_scale_max <= 0:
            raise ValueError(f"logit_scale_max must be > 0, got {self.logit_scale_max}.")


__all__ = ["OCCLIPBindingConfig", "OCCLIPConfig", "OCCLIPTextConfig", "OCCLIPVisionConfig"]
