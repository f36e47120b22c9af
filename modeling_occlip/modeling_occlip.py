"""OC-CLIP: object-centric binding in contrastive language-image pre-training, as a transformers model.

The towers are transformers' CLIP towers under CLIP's parameter names, so CLIP checkpoints load unchanged. A
caption is a scene graph given as padded tensors: one short text sequence per node ("red cube") and per
relation predicate ("left of"), subject/object indices per relation, and masks.
"""

from dataclasses import dataclass
from os import PathLike

import torch
from torch import nn
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import PrefixChange
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import (
    CLIPModel,
    CLIPPreTrainedModel,
    CLIPTextModel,
    CLIPVisionModel,
)
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple, logging

from .binding_occlip import GraphPairInputs, OCCLIPBindingModule, OCCLIPStructuredSimilarity
from .configuration_occlip import OCCLIPConfig, OCCLIPTextConfig, OCCLIPVisionConfig

logger = logging.get_logger(__name__)

# The keyword arguments the models honour beyond their named ones, which `forward` passes on to the towers (the
# only ones `_check_kwargs` lets through).
_OUTPUT_FLAGS = ("output_attentions", "output_hidden_states")
_GRAPH_INPUT_NAMES = (
    "node_input_ids",
    "node_attention_mask",
    "node_mask",
    "relation_input_ids",
    "relation_attention_mask",
    "relation_mask",
    "relation_subject_index",
    "relation_object_index",
)
# Where scene-graph inputs belong, for the error a caller gets passing them to a method that takes plain captions.
_GRAPH_INPUT_HINTS = {
    name: "Scene-graph inputs go to OCCLIPModel.get_graph_features (or forward)." for name in _GRAPH_INPUT_NAMES
}


@dataclass
class OCCLIPImageFeatures(BaseModelOutputWithPooling):
    r"""
    Per-image features of OC-CLIP, cacheable: [`OCCLIPModel.get_image_features`] fills every field it was asked for;
    [`OCCLIPModel.score`] needs only `binding_keys` and `binding_values`.

    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_patches + 1, vision_hidden_size)`):
        Last hidden state of the vision tower (CLS token first), as in CLIP's `get_image_features`.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        The projected, unnormalised global image embedding: `visual_projection` of the vision tower's pooled
        output, equal to `CLIPModel.get_image_features(...).pooler_output` for the same towers. Used by
        reranking and global retrieval; the structured loss does not train it (see [`OCCLIPModel`]).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The vision tower's embeddings output and every layer's output, each `(batch_size, num_patches + 1,
        vision_hidden_size)`.
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
        The vision tower's self-attention weights per layer, each `(batch_size, num_heads, num_patches + 1,
        num_patches + 1)`.
    binding_keys (`torch.FloatTensor` of shape `(batch_size, binding_layers, binding_heads, num_patches,
        binding_head_dim)`):
        Per-layer patch keys of the binding module with its query projection and scale folded in.
    binding_values (`torch.FloatTensor` of the same shape as `binding_keys`):
        Per-layer patch values of the binding module with its output projection folded in.
    """

    binding_keys: torch.Tensor | None = None
    binding_values: torch.Tensor | None = None


@dataclass
class OCCLIPGraphFeatures(ModelOutput):
    r"""
    Per-caption scene-graph features of OC-CLIP ([`OCCLIPModel.get_graph_features`]), cacheable.

    The masks stay `torch.bool` (and the indices `torch.long`): the structured similarity and the relation loss use
    them as masks and indices. transformers' generic output-equivalence check subtracts outputs, which bool tensors
    do not support; `to_tuple()` keeps them, and this project's tests compare such entries exactly.

    node_embeds (`torch.FloatTensor` of shape `(num_captions, max_nodes, text_embed_dim)`):
        Embedding of each node phrase (text tower pooled output, projected when
        `config.text_embedding_source == "projected"`); zeros where `node_mask` is False.
    node_mask (`torch.BoolTensor` of shape `(num_captions, max_nodes)`):
        True for the caption's nodes, False for padding.
    relation_embeds (`torch.FloatTensor` of shape `(num_captions, max_relations, text_embed_dim)`):
        Embedding of each relation predicate ("left of"); zeros where `relation_mask` is False.
    relation_mask (`torch.BoolTensor` of shape `(num_captions, max_relations)`):
        True for the caption's relations, False for padding.
    relation_subject_index (`torch.LongTensor` of shape `(num_captions, max_relations)`):
        Node index of each relation's subject; 0 where padded.
    relation_object_index (`torch.LongTensor` of shape `(num_captions, max_relations)`):
        Node index of each relation's object; 0 where padded.
    relation_predicate_id (`torch.LongTensor` of shape `(num_captions, max_relations)`):
        Equal ids mean the same predicate text within this batch; -1 where padded.
    """

    node_embeds: torch.Tensor | None = None
    node_mask: torch.Tensor | None = None
    relation_embeds: torch.Tensor | None = None
    relation_mask: torch.Tensor | None = None
    relation_subject_index: torch.Tensor | None = None
    relation_object_index: torch.Tensor | None = None
    relation_predicate_id: torch.Tensor | None = None

    @property
    def num_captions(self) -> int:
        """Number of captions (graphs) held."""
        return self.node_embeds.shape[0]


@dataclass
class OCCLIPOutput(ModelOutput):
    r"""
    Output of [`OCCLIPModel.forward`].

    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
        `loss_itc + rel_loss_weight * loss_rel`.
    logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, caption_batch_size)`, *optional*):
        Structured logits `exp(t) * s(x, G)` of every (image, scene graph) pair; absent with `return_logits=False`.
    logits_per_text (`torch.FloatTensor` of shape `(caption_batch_size, image_batch_size)`, *optional*):
        The transpose of `logits_per_image`.
    loss_itc (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
        Symmetric InfoNCE over the structured logits.
    loss_rel (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True` and
        `config.rel_loss_weight` is not 0):
        Local graph contrastive loss (each pair against its relation-perturbed graphs).
    text_embeds (`torch.FloatTensor` of shape `(caption_batch_size, projection_dim)`, *optional*, returned when
        `input_ids` are given):
        Normalised global caption embeddings, as `CLIPOutput.text_embeds`.
    image_embeds (`torch.FloatTensor` of shape `(image_batch_size, projection_dim)`):
        Normalised global image embeddings, as `CLIPOutput.image_embeds`.
    text_model_output (`BaseModelOutputWithPooling`, *optional*, returned when `input_ids` are given):
        [`OCCLIPModel.get_text_features`] of the plain captions (`pooler_output` projected).
    image_features (`OCCLIPImageFeatures`):
        [`OCCLIPModel.get_image_features`] of the images (vision tower outputs and binding keys/values).
    graph_features (`OCCLIPGraphFeatures`):
        [`OCCLIPModel.get_graph_features`] of the scene graphs.
    binding_attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
        Query-softmax attention of each binding layer for every (image, caption) pair, each `(image_batch_size,
        binding_heads, caption_batch_size, num_queries, num_patches)`; queries are the caption's nodes, then
        the default queries.
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    loss_itc: torch.Tensor | None = None
    loss_rel: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    image_features: OCCLIPImageFeatures | None = None
    graph_features: OCCLIPGraphFeatures | None = None
    binding_attentions: tuple[torch.Tensor, ...] | None = None

    def to_tuple(self) -> tuple:
        """The set fields in order, nested outputs turned into tuples too (as `CLIPOutput.to_tuple`)."""
        return tuple(value.to_tuple() if isinstance(value, ModelOutput) else value for value in self.values())


@dataclass
class OCCLIPRerankOutput(ModelOutput):
    r"""
    Output of [`OCCLIPModel.rerank`]: per query, the shortlisted candidates re-ordered by the fused score.

    indices (`torch.LongTensor` of shape `(num_queries, top_k)`):
        Candidate indices (images for text queries, captions for image queries), best first.
    scores (`torch.FloatTensor` of shape `(num_queries, top_k)`):
        Fused scores `z_oc + global_weight * z_global`, in the order of `indices`.
    structured_logits (`torch.FloatTensor` of shape `(num_queries, top_k)`):
        The OC-CLIP part `z_oc`, in the order of `indices`.
    global_logits (`torch.FloatTensor` of shape `(num_queries, top_k)`):
        The first-stage part `z_global`, in the order of `indices`.
    """

    indices: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    structured_logits: torch.Tensor | None = None
    global_logits: torch.Tensor | None = None


def occlip_loss(
    logits_per_image: torch.Tensor,
    logits_per_text: torch.Tensor,
    relation_terms: torch.Tensor | None = None,
    num_relation_terms: torch.Tensor | None = None,
    rel_loss_weight: float = 0.0,
    labels: torch.Tensor | None = None,
    scored_fraction: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`(loss, loss_itc, loss_rel)`: OC-CLIP's `L_itc + rel_loss_weight * L_rel`.

    logits_per_image / logits_per_text (`[r, N]`): structured logits of the scored rows against every column
        (`OCCLIPModel.score`); a trainer passes the gathered batch's columns.
    labels (`[r]`): each row's matching column (default `arange(r)`, image k paired with caption k).
    relation_terms (`[n]`): `OCCLIPModel.relation_loss_terms` of the scored pairs; `num_relation_terms` their
        number over the whole batch. `L_rel` is their mean over the batch.
    scored_fraction: the share of the batch's pairs whose relation terms are given (a process's own: 1/world);
        the sum is divided by it, so that the mean over processes is the batch's loss.
    """
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device) if labels is None else labels
    loss_itc = 0.5 * (
        nn.functional.cross_entropy(logits_per_image, labels) + nn.functional.cross_entropy(logits_per_text, labels)
    )
    if not rel_loss_weight or relation_terms is None:
        return loss_itc, loss_itc, None
    total = (
        relation_terms.new_tensor(float(relation_terms.numel())) if num_relation_terms is None else num_relation_terms
    )
    loss_rel = relation_terms.sum() / scored_fraction / total.clamp(min=1)
    return loss_itc + rel_loss_weight * loss_rel, loss_itc, loss_rel


def _refuse_missing_weights(info: dict, what: str, source, hint: str = "") -> None:
    """Raise, naming them, if a load left weights missing (they would silently start random)."""
    missing = sorted(info["missing_keys"])
    if missing:
        # Eight names, then the count: a whole missing module would otherwise print hundreds of keys.
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ValueError(
            f"{what}.from_pretrained({str(source)!r}): these weights are not in the checkpoint and would start "
            f"random: {shown}.{hint} Pass output_loading_info=True to load anyway and inspect missing_keys."
        )


def _load_clip(clip, target: str) -> CLIPModel:
    """`clip` itself, or the `CLIPModel` of a CLIP checkpoint folder or Hub id. Another model type (a trained
    OC-CLIP or CLOC folder, whose heads would be dropped for fresh ones) or missing tower weights are refused."""
    if isinstance(clip, CLIPModel):
        return clip
    model_type = PreTrainedConfig.get_config_dict(clip)[0].get("model_type")
    if model_type is not None and model_type != "clip":
        raise ValueError(
            f"{target}.from_clip needs a CLIP checkpoint (model_type 'clip'), but {str(clip)!r} holds model_type "
            f"{model_type!r}: its own heads would be dropped and new ones start random. Load a trained checkpoint "
            f"with {target}.from_pretrained or AutoModel.from_pretrained."
        )
    clip_model, info = CLIPModel.from_pretrained(clip, output_loading_info=True)
    _refuse_missing_weights(info, "CLIPModel", clip)
    return clip_model


# The same function stands in modeling_cloc/modeling_cloc.py: each model folder must work alone as remote code.
def _clip_config_fields(clip: CLIPModel) -> dict:
    """What a model built from `clip` takes from its config: both towers, the projection width, the logit scale."""
    return dict(
        text_config=clip.config.text_config.to_dict(),
        vision_config=clip.config.vision_config.to_dict(),
        projection_dim=clip.config.projection_dim,
        logit_scale_init_value=float(clip.logit_scale.detach()),
    )


# The same function stands in modeling_cloc/modeling_cloc.py: each model folder must work alone as remote code.
def _load_clip_weights(model: nn.Module, clip: CLIPModel, new_modules: tuple[str, ...]) -> None:
    """Copy `clip`'s towers, projections and logit scale into `model` (same parameter names); every weight of
    `model` that `clip` lacks must belong to `new_modules` (name prefixes), and `clip` may hold nothing else."""
    incompatible = model.load_state_dict(clip.state_dict(), strict=False)
    unexpected = list(incompatible.unexpected_keys)
    missing = [key for key in incompatible.missing_keys if not key.startswith(new_modules)]
    if unexpected or missing:
        # The first five names of each kind: enough to recognise the mismatch without printing a whole state dict.
        raise ValueError(
            f"CLIP checkpoint does not match {type(model).__name__}'s towers: unexpected {unexpected[:5]}, "
            f"missing {missing[:5]}."
        )


def _refuse_incomplete_load(name: str, model, info: dict, args: tuple, kwargs: dict) -> None:
    """After `from_pretrained`: weights missing from the checkpoint are an error naming them (and the checkpoint's
    model_type when it is another), not random heads with only a printed report."""
    if not info["missing_keys"]:
        return
    source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    try:
        saved_type = PreTrainedConfig.get_config_dict(source, **_hub_kwargs(kwargs))[0].get("model_type")
    except (OSError, TypeError, ValueError):  # weights passed without a config file: no model_type to name
        saved_type = None
    expected, hint = type(model.config).model_type, ""  # the instance's model_type is the checkpoint's
    if saved_type is not None and saved_type != expected:
        hint = (
            f" The checkpoint holds model_type {saved_type!r}, not {expected!r}: load it with "
            "AutoModel.from_pretrained, or start from a CLIP checkpoint with from_clip."
        )
    _refuse_missing_weights(info, name, source, hint)


def _hub_kwargs(kwargs: dict) -> dict:
    keys = ("cache_dir", "revision", "subfolder", "local_files_only", "token")
    return {key: kwargs[key] for key in keys if key in kwargs}


class OCCLIPPreTrainedModel(CLIPPreTrainedModel):
    """Weights initialisation and flags shared by the OC-CLIP models."""

    config: OCCLIPConfig
    base_model_prefix = "occlip"
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings", "OCCLIPBindingModule"]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' `from_pretrained`, but weights missing from the checkpoint (e.g. a folder of another model
        type) are an error naming them; with `output_loading_info=True` they are left to the caller."""
        if kwargs.pop("output_loading_info", False):
            return super().from_pretrained(*args, output_loading_info=True, **kwargs)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        _refuse_incomplete_load(cls.__name__, model, info, args, kwargs)
        return model

    @torch.no_grad()
    def _init_weights(self, module):
        """CLIP towers, projections and logit scale as `CLIPModel` does; the binding module and structured
        similarity by their own rule: `_init_head(binding_config.initializer_std)`, default queries N(0, std), the
        position map at unit scale, alpha and beta at `binding_config.score_weight_init`."""
        super()._init_weights(module)
        if not isinstance(self.config, OCCLIPConfig):
            return
        std = self.config.binding_config.initializer_std(self.config.binding_width)
        if isinstance(module, OCCLIPModel):
            _init_clip_head(module, self.config)
        elif isinstance(module, OCCLIPBindingModule):
            _init_head(module, std)
            init.normal_(module.default_queries, std=std)
            if module.position_proj is not None:
                # Unit scale, like the layer-normed patch features it is added to, so position is used from step 0.
                init.normal_(module.position_proj.weight, std=module.position_proj.in_features**-0.5)
        elif isinstance(module, OCCLIPStructuredSimilarity):
            _init_head(module, std)
            log_weight = torch.log(torch.tensor(self.config.binding_config.score_weight_init)).item()
            init.constant_(module.log_alpha, log_weight)
            init.constant_(module.log_beta, log_weight)

    def initialize_weights(self):
        """Every module through `_init_weights`, as transformers does for its own models (see
        `_initialize_every_module`)."""
        _initialize_every_module(self)


# The same function stands in modeling_cloc/modeling_cloc.py: each model folder must work alone as remote code.
@torch.no_grad()
def _initialize_every_module(model: PreTrainedModel) -> None:
    """`PreTrainedModel.initialize_weights` without the shortcut transformers takes for custom code.

    For a model defined outside the library, transformers skips every module that owns no parameter directly (CLIP's
    attention and MLP blocks, our heads), so their linear layers keep the generic N(0, 0.02) instead of CLIP's
    depth-scaled init. That shortcut protects remote code that writes weights in place; our `_init_weights` only
    writes through `transformers.initialization`, which leaves loaded (`_is_hf_initialized`) tensors alone, so every
    module is visited as for the library's own models: children first, each sub-model with its own `_init_weights`.
    """

    def visit(module: nn.Module, initialize) -> None:
        for child in module.children():
            visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else initialize)
        initialize(module, is_custom_code=False)

    with init.guard_torch_init_functions():
        visit(model, model._initialize_weights)


# The same function stands in modeling_cloc/modeling_cloc.py: each model folder must work alone as remote code.
def _init_clip_head(model: nn.Module, config) -> None:
    """The projections and logit scale of a model built from a CLIP config, exactly as `CLIPModel._init_weights`."""
    factor = config.initializer_factor
    init.normal_(model.text_projection.weight, std=config.text_config.hidden_size**-0.5 * factor)
    init.normal_(model.visual_projection.weight, std=config.vision_config.hidden_size**-0.5 * factor)
    init.constant_(model.logit_scale, config.logit_scale_init_value)


# The same function stands in modeling_cloc/modeling_cloc.py: each model folder must work alone as remote code.
def _init_head(module: nn.Module, std: float) -> None:
    """Normal(0, std) linear weights, zero biases, unit LayerNorms for `module` and every submodule."""
    for child in module.modules():
        if isinstance(child, nn.Linear):
            init.normal_(child.weight, std=std)
            if child.bias is not None:
                init.zeros_(child.bias)
        elif isinstance(child, nn.LayerNorm):
            init.ones_(child.weight)
            init.zeros_(child.bias)


# The same function stands in modeling_cloc/modeling_cloc.py: each model folder must work alone as remote code.
def _output_flag(config, name: str, value: bool | None) -> bool:
    """An output flag (`output_attentions`, ...) from the call, else from the config (as transformers'
    `merge_with_config_defaults`)."""
    return bool(getattr(config, name, False) if value is None else value)


# The same function stands in modeling_cloc/modeling_cloc.py: each model folder must work alone as remote code.
def _check_kwargs(kwargs: dict, method: str, hints: dict[str, str] | None = None) -> None:
    """Keyword arguments beyond a method's own may only be the output flags the models honour
    (`output_attentions`, `output_hidden_states`); anything else, a misspelt argument or one of transformers'
    `TransformersKwargs` for packed or MoE language models that these models would ignore, is an error rather than
    silently dropped. `hints` maps an argument name to a sentence saying where it belongs."""
    unknown = sorted(set(kwargs) - {"output_attentions", "output_hidden_states"})
    if unknown:
        notes = sorted({hints[name] for name in unknown if hints and name in hints})
        raise TypeError(
            f"{method}() got unexpected keyword argument(s): {', '.join(map(repr, unknown))}."
            + "".join(f" {note}" for note in notes)
        )


# The same function stands in modeling_cloc/modeling_cloc.py: each model folder must work alone as remote code.
def _check_pixel_values(pixel_values: torch.Tensor, vision, any_size: bool = False, square_grid: bool = False) -> None:
    """Shape, batch and dtype of `pixel_values` for a vision config, with errors that say what to do; `any_size`
    (CLIP's `interpolate_pos_encoding`) lets the height and width differ from the config's `image_size`;
    `square_grid` (paths that place patch tokens on a square grid: OC-CLIP's binding, CLOC's Prompter and RoI
    head) requires as many patch rows as columns."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
    expected = (vision.num_channels, vision.image_size, vision.image_size)
    shape = tuple(pixel_values.shape)
    if pixel_values.dim() != 4 or shape[1:] != expected and not (any_size and shape[1] == expected[0]):
        raise ValueError(
            f"pixel_values has shape {tuple(pixel_values.shape)}, expected [batch, {expected[0]}, {expected[1]}, "
            f"{expected[2]}] for this model (image_size={vision.image_size}); resize the images with the processor, or "
            "pass interpolate_pos_encoding=True."
        )
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values holds no image.")
    if not pixel_values.is_floating_point():
        # Raw 0-255 integers would run through the towers as if normalised, giving a silently wrong answer.
        raise ValueError(
            f"pixel_values has dtype {pixel_values.dtype}; the model takes normalised float pixels (the processor's "
            "output), not raw 0-255 values."
        )
    rows, columns = pixel_values.shape[-2] // vision.patch_size, pixel_values.shape[-1] // vision.patch_size
    if square_grid and rows != columns:
        raise ValueError(
            f"pixel_values of {pixel_values.shape[-2]} x {pixel_values.shape[-1]} pixels give a {rows} x {columns} "
            "patch grid; this path places the patch tokens on a square grid: pass square images (the processor's "
            "center crop makes them square)."
        )


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple, what: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(tensor).__name__}.")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)} ({what}).")


def _as_bool_mask(name: str, mask: torch.Tensor | None, shape: tuple, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    _check_shape(name, mask, shape, "one flag per entry")
    return mask.to(device=device, dtype=torch.bool)


class OCCLIPModel(OCCLIPPreTrainedModel):
    """OC-CLIP: CLIP towers, a binding module that gives one visual slot per scene-graph node, and a structured
    similarity (object terms + relation terms) in place of the single cosine.

    Use `get_image_features` / `get_graph_features` to cache each side once, `score` for all pairs, `score_pairs`
    for selected pairs and `rerank` to rescore a global-CLIP shortlist. `get_text_features` gives CLIP's global
    caption embedding of plain tokenized captions.

    The global embeddings (`visual_projection` over the vision tower's `post_layernorm`, and `text_projection` of
    whole captions) serve `get_image_features` / `get_text_features` and reranking. The structured loss reads the
    patch tokens and phrase embeddings only, so it does not train `visual_projection` or the vision
    `post_layernorm`: they keep the values of the CLIP the model was built from.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image", "text")

    def __init__(self, config: OCCLIPConfig):
        super().__init__(config)
        self.text_model = CLIPTextModel._from_config(config.text_config)
        self.vision_model = CLIPVisionModel._from_config(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.binding = OCCLIPBindingModule(config)
        self.similarity = OCCLIPStructuredSimilarity(config)
        self.post_init()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_clip(
        cls, clip: "str | PathLike | CLIPModel", binding_config: dict | None = None, **config_kwargs
    ) -> "OCCLIPModel":
        """Build OC-CLIP whose towers, projections and logit scale are those of a transformers `CLIPModel`.

        `clip` is a `CLIPModel` or a folder (or Hub id, where the Hub is reachable) that `CLIPModel.from_pretrained`
        loads. The binding module and structured similarity are new and freshly initialised.
        """
        clip = _load_clip(clip, "OCCLIPModel")
        config = OCCLIPConfig(**_clip_config_fields(clip), binding_config=binding_config, **config_kwargs)
        model = cls(config)
        _load_clip_weights(model, clip, ("binding.", "similarity."))
        return model.to(dtype=next(clip.parameters()).dtype)

    # ------------------------------------------------------------------ per-image side

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | OCCLIPImageFeatures:
        """Per-image cache, CLIP-shaped: the vision tower's outputs with `pooler_output` the projected global image
        embedding (as `CLIPModel.get_image_features`), plus the folded binding keys/values `score` needs.

        Args:
            pixel_values: `[B, C, H, W]` normalised images (the processor's output).
            interpolate_pos_encoding: interpolate the tower's position embeddings for images of another size.
            output_attentions / output_hidden_states: the vision tower's attentions / hidden states.
        """
        _check_kwargs(kwargs, "OCCLIPModel.get_image_features")
        _check_pixel_values(pixel_values, self.config.vision_config, interpolate_pos_encoding, square_grid=True)
        layer = self.config.binding_config.vision_feature_layer
        output_hidden_states = _output_flag(self.config, "output_hidden_states", kwargs.get("output_hidden_states"))
        vision_outputs = self.vision_model(
            pixel_values=pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_hidden_states=output_hidden_states or layer != -1,
            output_attentions=_output_flag(self.config, "output_attentions", kwargs.get("output_attentions")),
            return_dict=True,
        )
        hidden = vision_outputs.last_hidden_state if layer == -1 else vision_outputs.hidden_states[layer]
        keys, values = self.binding.encode_image(hidden[:, 1:])  # CLS dropped: binding sees patches only
        return OCCLIPImageFeatures(
            last_hidden_state=vision_outputs.last_hidden_state,
            pooler_output=self.visual_projection(vision_outputs.pooler_output),
            hidden_states=vision_outputs.hidden_states if output_hidden_states else None,
            attentions=vision_outputs.attentions,
            binding_keys=keys,
            binding_values=values,
        )

    # ------------------------------------------------------------------ per-caption side

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        """Global embedding of plain tokenized captions, exactly as `CLIPModel.get_text_features`: the text tower's
        outputs with `pooler_output` replaced by its `text_projection`. OC-CLIP keeps it for reranking; the
        scene-graph features that `score` consumes come from `get_graph_features`.

        Args:
            input_ids: `[B, L]` caption token ids (the CLIP tokenizer's output).
            attention_mask: `[B, L]`; position_ids: `[B, L]`, as for `CLIPTextModel`.
            output_attentions / output_hidden_states: the text tower's attentions / hidden states.
        """
        _check_kwargs(
            kwargs, "OCCLIPModel.get_text_features", _GRAPH_INPUT_HINTS
        )  # before input_ids: names graph inputs
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(
                f"input_ids must be a [captions, tokens] tensor of plain tokenized captions, got {shape}; "
                "scene graphs go to get_graph_features."
            )
        text_outputs = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_attentions=_output_flag(self.config, "output_attentions", kwargs.get("output_attentions")),
            output_hidden_states=_output_flag(self.config, "output_hidden_states", kwargs.get("output_hidden_states")),
            return_dict=True,
        )
        text_outputs.pooler_output = self.text_projection(text_outputs.pooler_output)
        return text_outputs

    def _check_phrase_length(self, name: str, input_ids: torch.Tensor) -> None:
        if input_ids.shape[-1] > self.config.text_config.max_position_embeddings:
            raise ValueError(
                f"{name} has {input_ids.shape[-1]} tokens per phrase, more than the text tower's "
                f"max_position_embeddings ({self.config.text_config.max_position_embeddings})."
            )

    def _check_phrase_tokens(self, name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, valid) -> None:
        eos = self.config.text_config.eos_token_id
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.text_config.vocab_size):
            raise ValueError(
                f"{name} holds token ids outside the vocabulary [0, {self.config.text_config.vocab_size})."
            )
        # CLIPTextTransformer pools at the first eos token, except when eos_token_id == 2: that legacy value of early
        # CLIP configs makes it pool at the highest token id instead, so there is no eos token to require.
        if isinstance(eos, int) and eos != 2:
            has_eos = ((input_ids == eos) & attention_mask.bool()).any(-1)
            missing = (~has_eos) & valid
            if missing.any():
                caption, entry = missing.nonzero()[0].tolist()
                raise ValueError(
                    f"{name}[{caption}, {entry}] has no end-of-text token ({eos}) inside its attention mask; the text "
                    f"tower pools at that token. Tokenize phrases with the CLIP tokenizer."
                )

    def check_graph_inputs(
        self,
        node_input_ids: torch.Tensor,
        node_attention_mask: torch.Tensor | None = None,
        node_mask: torch.Tensor | None = None,
        relation_input_ids: torch.Tensor | None = None,
        relation_attention_mask: torch.Tensor | None = None,
        relation_mask: torch.Tensor | None = None,
        relation_subject_index: torch.Tensor | None = None,
        relation_object_index: torch.Tensor | None = None,
        values: bool = True,
    ) -> None:
        """Raise `ValueError` naming the caption and field if the padded scene graphs are malformed.

        First the types, shapes and phrase lengths, which read shapes only; then, with `values`, the values: every
        caption has a node, token ids lie in the vocabulary and each phrase holds the end-of-text token, relations
        point to valid, distinct nodes. The value checks read the tensors on the host (one device sync each), so
        `get_graph_features(validate_inputs=False)`, meant for `OCCLIPProcessor`'s outputs (valid by construction),
        runs the shape checks only (`values=False`).
        """
        self._check_node_shapes(node_input_ids, node_attention_mask, node_mask)
        if relation_input_ids is None:
            if relation_subject_index is not None or relation_object_index is not None:
                raise ValueError("relation indices were given without relation_input_ids.")
        else:
            self._check_relation_shapes(
                node_input_ids.shape[0],
                relation_input_ids,
                relation_attention_mask,
                relation_mask,
                relation_subject_index,
                relation_object_index,
            )
        if not values:
            return
        node_mask = self._check_node_values(node_input_ids, node_attention_mask, node_mask)
        if relation_input_ids is not None:
            self._check_relation_values(
                node_mask,
                relation_input_ids,
                relation_attention_mask,
                relation_mask,
                relation_subject_index,
                relation_object_index,
            )

    def _check_node_shapes(self, node_input_ids, node_attention_mask, node_mask) -> None:
        if not isinstance(node_input_ids, torch.Tensor) or node_input_ids.dim() != 3:
            shape = tuple(node_input_ids.shape) if isinstance(node_input_ids, torch.Tensor) else type(node_input_ids)
            raise ValueError(f"node_input_ids must be a [captions, nodes, tokens] tensor, got {shape}.")
        if node_input_ids.dtype.is_floating_point:
            raise ValueError("node_input_ids must hold integer token ids.")
        num_captions, num_nodes, _ = node_input_ids.shape
        if num_captions == 0 or num_nodes == 0:
            raise ValueError(f"node_input_ids has shape {tuple(node_input_ids.shape)}: no caption or no node slot.")
        if node_attention_mask is not None:
            _check_shape("node_attention_mask", node_attention_mask, node_input_ids.shape, "same as node_input_ids")
        if node_mask is not None:
            _check_shape("node_mask", node_mask, (num_captions, num_nodes), "one flag per entry")
        self._check_phrase_length("node_input_ids", node_input_ids)

    def _check_relation_shapes(
        self,
        num_captions: int,
        relation_input_ids,
        relation_attention_mask,
        relation_mask,
        subject_index,
        object_index,
    ) -> None:
        if relation_input_ids.dim() != 3 or relation_input_ids.shape[0] != num_captions:
            raise ValueError(
                f"relation_input_ids has shape {tuple(relation_input_ids.shape)}, expected [{num_captions}, relations,"
                " tokens] (one row of relations per caption of node_input_ids)."
            )
        num_relations = relation_input_ids.shape[1]
        if relation_attention_mask is not None:
            _check_shape(
                "relation_attention_mask",
                relation_attention_mask,
                relation_input_ids.shape,
                "same as relation_input_ids",
            )
        if relation_mask is not None:
            _check_shape("relation_mask", relation_mask, (num_captions, num_relations), "one flag per entry")
        if subject_index is None or object_index is None:
            raise ValueError("relation_input_ids needs both relation_subject_index and relation_object_index.")
        for name, index in (("relation_subject_index", subject_index), ("relation_object_index", object_index)):
            _check_shape(name, index, (num_captions, num_relations), "one node index per relation")
        if num_relations:
            self._check_phrase_length("relation_input_ids", relation_input_ids)

    def _check_node_values(self, node_input_ids, node_attention_mask, node_mask) -> torch.Tensor:
        """The node checks that read values (host syncs); returns `node_mask` as bool."""
        if node_attention_mask is None:
            node_attention_mask = torch.ones_like(node_input_ids)
        node_mask = _as_bool_mask("node_mask", node_mask, node_input_ids.shape[:2], node_input_ids.device)
        empty = (~node_mask.any(-1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"caption {empty[0]} has zero valid nodes (node_mask is all False); a graph needs a node."
            )
        self._check_phrase_tokens("node_input_ids", node_input_ids, node_attention_mask, node_mask)
        return node_mask

    def _check_relation_values(
        self, node_mask, relation_input_ids, relation_attention_mask, relation_mask, subject_index, object_index
    ) -> None:
        """The relation checks that read values (host syncs), against the bool `node_mask`."""
        num_captions, num_nodes = node_mask.shape
        num_relations = relation_input_ids.shape[1]
        if relation_attention_mask is None:
            relation_attention_mask = torch.ones_like(relation_input_ids)
        relation_mask = _as_bool_mask("relation_mask", relation_mask, (num_captions, num_relations), node_mask.device)
        for name, index in (("relation_subject_index", subject_index), ("relation_object_index", object_index)):
            index = index.long()
            in_range = (index >= 0) & (index < num_nodes)
            safe = index.clamp(0, num_nodes - 1)
            points_to_node = in_range & node_mask.gather(1, safe)
            bad = relation_mask & ~points_to_node
            if bad.any():
                caption, relation = bad.nonzero()[0].tolist()
                raise ValueError(
                    f"caption {caption}, relation {relation}: {name} = {int(index[caption, relation])} does not point to"
                    f" a valid node (the caption has {int(node_mask[caption].sum())} valid of {num_nodes} node slots)."
                )
        self_loops = relation_mask & (subject_index.long() == object_index.long())
        if self_loops.any():
            caption, relation = self_loops.nonzero()[0].tolist()
            raise ValueError(f"caption {caption}, relation {relation}: subject and object are the same node.")
        if num_relations:
            self._check_phrase_tokens("relation_input_ids", relation_input_ids, relation_attention_mask, relation_mask)

    def _encode_phrases(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed phrases `[n, L]`; each distinct phrase runs through the text tower once.

        Returns the embeddings `[n, D_e]` and an id per phrase (equal ids = equal text). `torch.unique` is the one
        device sync of the graph path: its output size depends on the data, and it is what lets a batch's repeated
        phrases ("left of", "red cube") cost one text-tower row each.
        """
        key = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, -1))
        unique_keys, inverse = torch.unique(key, dim=0, return_inverse=True)
        representative = torch.full(
            (unique_keys.shape[0],), input_ids.shape[0], dtype=torch.long, device=input_ids.device
        )
        representative = representative.scatter_reduce(
            0, inverse, torch.arange(input_ids.shape[0], device=input_ids.device), "amin"
        )
        outputs = self.text_model(
            input_ids=input_ids[representative], attention_mask=attention_mask[representative], return_dict=True
        )
        embeds = outputs.pooler_output
        if self.config.text_embedding_source == "projected":
            embeds = self.text_projection(embeds)
        return embeds[inverse], inverse

    @can_return_tuple
    def get_graph_features(
        self,
        node_input_ids: torch.Tensor,
        node_attention_mask: torch.Tensor | None = None,
        node_mask: torch.Tensor | None = None,
        relation_input_ids: torch.Tensor | None = None,
        relation_attention_mask: torch.Tensor | None = None,
        relation_mask: torch.Tensor | None = None,
        relation_subject_index: torch.Tensor | None = None,
        relation_object_index: torch.Tensor | None = None,
        validate_inputs: bool = True,
    ) -> tuple | OCCLIPGraphFeatures:
        """Per-caption cache for `score`: node and predicate embeddings of padded scene graphs.

        Args:
            node_input_ids: `[T, M, L]` token ids of each node phrase ("red cube").
            node_attention_mask: `[T, M, L]`; defaults to all ones.
            node_mask: `[T, M]` valid nodes; defaults to all valid.
            relation_input_ids: `[T, P, L']` token ids of each predicate ("left of"), or `None` for no relations.
            relation_attention_mask: `[T, P, L']`; relation_mask: `[T, P]`.
            relation_subject_index / relation_object_index: `[T, P]` node index of each relation's endpoints.
            validate_inputs: run all of `check_graph_inputs` first (host syncs); `False` for processor outputs,
                which then get its shape checks only (no sync).
        """
        self.check_graph_inputs(
            node_input_ids,
            node_attention_mask,
            node_mask,
            relation_input_ids,
            relation_attention_mask,
            relation_mask,
            relation_subject_index,
            relation_object_index,
            values=validate_inputs,
        )
        device = node_input_ids.device
        num_captions, num_nodes, _ = node_input_ids.shape
        if node_attention_mask is None:
            node_attention_mask = torch.ones_like(node_input_ids)
        node_mask = node_input_ids.new_ones(num_captions, num_nodes) if node_mask is None else node_mask
        if relation_input_ids is None:
            relation_input_ids = node_input_ids.new_zeros(num_captions, 0, 1)
            relation_mask = relation_subject_index = relation_object_index = node_input_ids.new_zeros(num_captions, 0)
        if relation_attention_mask is None:
            relation_attention_mask = torch.ones_like(relation_input_ids)
        if relation_mask is None:
            relation_mask = relation_input_ids.new_ones(relation_input_ids.shape[:2])
        node_mask, relation_mask = node_mask.to(device, torch.bool), relation_mask.to(device, torch.bool)
        num_relations = relation_input_ids.shape[1]

        # Nodes and predicates share one pass through the text tower, padded to a common length. Padded entries
        # become one all-pad phrase with a full attention mask (a fully masked row could give NaN attention), so
        # no host-side selection of the valid entries is needed; their embeddings are zeroed below.
        length = max(node_input_ids.shape[-1], relation_input_ids.shape[-1])
        pad_id = self.config.text_config.pad_token_id or 0

        def rows(ids, attention, valid):
            pad = length - ids.shape[-1]
            ids = nn.functional.pad(ids, (0, pad), value=pad_id).flatten(0, 1)
            attention = nn.functional.pad(attention, (0, pad), value=0).flatten(0, 1)
            valid = valid.flatten()[:, None]
            return torch.where(valid, ids, pad_id), torch.where(valid, attention, 1)

        node_ids, node_attention = rows(node_input_ids, node_attention_mask, node_mask)
        relation_ids, relation_attention = rows(relation_input_ids, relation_attention_mask, relation_mask)
        embeds, phrase_ids = self._encode_phrases(
            torch.cat([node_ids, relation_ids]), torch.cat([node_attention, relation_attention])
        )
        num_node_rows = node_ids.shape[0]
        node_embeds = embeds[:num_node_rows].view(num_captions, num_nodes, embeds.shape[-1])
        relation_embeds = embeds[num_node_rows:].view(num_captions, num_relations, embeds.shape[-1])
        return OCCLIPGraphFeatures(
            node_embeds=torch.where(node_mask[..., None], node_embeds, 0),
            node_mask=node_mask,
            relation_embeds=torch.where(relation_mask[..., None], relation_embeds, 0),
            relation_mask=relation_mask,
            relation_subject_index=torch.where(relation_mask, relation_subject_index.long(), 0),
            relation_object_index=torch.where(relation_mask, relation_object_index.long(), 0),
            relation_predicate_id=torch.where(relation_mask, phrase_ids[num_node_rows:].view_as(relation_mask), -1),
        )

    # ------------------------------------------------------------------ pair scoring

    def clamped_logit_scale(self) -> torch.Tensor:
        """The temperature the logits and the loss use: `exp(logit_scale)` capped at `config.logit_scale_max`."""
        return self.logit_scale.exp().clamp(max=self.config.logit_scale_max)

    def _prepare_graphs(self, graph_features: OCCLIPGraphFeatures) -> GraphPairInputs:
        return self.similarity.prepare_graphs(
            self.binding,
            graph_features.node_embeds,
            graph_features.node_mask,
            graph_features.relation_embeds,
            graph_features.relation_mask,
            graph_features.relation_subject_index,
            graph_features.relation_object_index,
        )

    def _bind(self, keys, values, graphs: GraphPairInputs, output_attentions: bool = False):
        return self.binding(
            keys,
            values,
            graphs.query,
            graphs.query_mask,
            graphs.node_mask.shape[-1],
            output_attentions=output_attentions,
        )

    @staticmethod
    def _check_features(image_features: OCCLIPImageFeatures, graph_features: OCCLIPGraphFeatures) -> None:
        if not isinstance(image_features, OCCLIPImageFeatures) or image_features.binding_keys is None:
            raise ValueError("image_features must come from OCCLIPModel.get_image_features.")
        if not isinstance(graph_features, OCCLIPGraphFeatures) or graph_features.node_embeds is None:
            raise ValueError("graph_features must come from OCCLIPModel.get_graph_features.")

    def _score_grid(
        self, image_features: OCCLIPImageFeatures, graph_features: OCCLIPGraphFeatures, output_attentions: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Unscaled structured similarity `[I, T]` of every pair, in tiles of about `pair_chunk_size` pairs, and with
        `output_attentions` each binding layer's attention `[I, H, T, Q, N]`."""
        keys, values = image_features.binding_keys, image_features.binding_values
        num_images, num_captions = keys.shape[0], graph_features.num_captions
        graphs = self._prepare_graphs(graph_features)
        chunk = self.config.pair_chunk_size
        caption_step = min(num_captions, chunk)
        image_step = max(1, chunk // caption_step)
        similarity_rows, attention_rows = [], []
        for i0 in range(0, num_images, image_step):
            similarity_row, attention_row = [], []
            for t0 in range(0, num_captions, caption_step):
                caption_chunk = GraphPairInputs(
                    **{k: v[:, t0 : t0 + caption_step] for k, v in graphs.__dict__.items()}
                )
                slots, attentions = self._bind(
                    keys[i0 : i0 + image_step], values[i0 : i0 + image_step], caption_chunk, output_attentions
                )
                similarity_row.append(self.similarity(slots, caption_chunk))
                attention_row.append(attentions)
            similarity_rows.append(torch.cat(similarity_row, dim=1))
            if output_attentions:  # captions are dim 2 of an attention map
                attention_rows.append([torch.cat(per_layer, dim=2) for per_layer in zip(*attention_row)])
        similarity = torch.cat(similarity_rows, dim=0)
        if not output_attentions:
            return similarity, None
        return similarity, tuple(torch.cat(per_layer, dim=0) for per_layer in zip(*attention_rows))

    def score(
        self, image_features: OCCLIPImageFeatures, graph_features: OCCLIPGraphFeatures, scale: bool = True
    ) -> torch.Tensor:
        """Structured logits `[I, T]` for every (image, caption) pair, computed in chunks of `pair_chunk_size` pairs.

        With `scale=False` the unscaled structured similarity `s(x, G)` in [-1, 1] is returned.
        """
        self._check_features(image_features, graph_features)
        similarity, _ = self._score_grid(image_features, graph_features, output_attentions=False)
        return similarity * self.clamped_logit_scale() if scale else similarity

    def score_pairs(
        self,
        image_features: OCCLIPImageFeatures,
        graph_features: OCCLIPGraphFeatures,
        image_index: torch.Tensor,
        text_index: torch.Tensor,
        scale: bool = True,
    ) -> torch.Tensor:
        """Structured logits `[n]` of the pairs `(image_index[k], text_index[k])` only.

        Pairs are grouped by image so each image's keys/values are read once per chunk, never copied per pair.
        """
        self._check_features(image_features, graph_features)
        image_index = torch.as_tensor(image_index, dtype=torch.long, device=image_features.binding_keys.device)
        text_index = torch.as_tensor(text_index, dtype=torch.long, device=image_index.device)
        if image_index.shape != text_index.shape or image_index.dim() != 1:
            raise ValueError(
                f"image_index {tuple(image_index.shape)} and text_index {tuple(text_index.shape)} must be equal-length"
                " 1-D tensors."
            )
        num_images, num_captions = image_features.binding_keys.shape[0], graph_features.num_captions
        if image_index.numel() and (image_index.min() < 0 or image_index.max() >= num_images):
            raise ValueError(f"image_index holds values outside [0, {num_images}).")
        if text_index.numel() and (text_index.min() < 0 or text_index.max() >= num_captions):
            raise ValueError(f"text_index holds values outside [0, {num_captions}).")
        graphs = self._prepare_graphs(graph_features)
        output = image_features.binding_keys.new_zeros(image_index.shape[0])
        order = torch.argsort(image_index, stable=True)
        images, counts = torch.unique_consecutive(image_index[order], return_counts=True)
        starts = (torch.cumsum(counts, 0) - counts).tolist()
        chunk = self.config.pair_chunk_size
        # Rows of (image, up to `chunk` of its pairs), longest first, so that tiles pad rows to similar lengths.
        rows = [
            (image, start + offset, min(chunk, count - offset))
            for image, start, count in zip(images.tolist(), starts, counts.tolist())
            for offset in range(0, count, chunk)
        ]
        rows.sort(key=lambda row: -row[2])
        tile_start = 0
        while tile_start < len(rows):
            width = rows[tile_start][2]
            tile_end = min(len(rows), tile_start + max(1, chunk // width))
            tile = torch.tensor(rows[tile_start:tile_end], device=image_index.device)
            offsets = torch.arange(width, device=image_index.device)
            valid = offsets[None, :] < tile[:, 2:3]
            positions = torch.where(valid, tile[:, 1:2] + offsets, tile[:, 1:2])
            pair_ids = order[positions]  # [rows, width] pair positions, padded with each row's first pair
            tile_graphs = graphs.select(text_index[pair_ids])
            keys = image_features.binding_keys[tile[:, 0]]
            slots, _ = self._bind(keys, image_features.binding_values[tile[:, 0]], tile_graphs)
            similarity = self.similarity(slots, tile_graphs)
            output = output.index_put((pair_ids[valid],), similarity[valid])
            tile_start = tile_end
        return output * self.clamped_logit_scale() if scale else output

    def bind_pairs(
        self,
        image_features: OCCLIPImageFeatures,
        graph_features: OCCLIPGraphFeatures,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The binding module on the pairs (image k, caption k) only: the slots `[B, Q, D_e]` (the caption's nodes,
        then the default queries) and, with `output_attentions`, each binding layer's query-softmax attention
        `[B, H, Q, N]` (else None).
        """
        self._check_features(image_features, graph_features)
        count = image_features.binding_keys.shape[0]
        if graph_features.num_captions != count:
            raise ValueError(
                f"bind_pairs pairs image k with caption k: got {count} images and {graph_features.num_captions} "
                "captions."
            )
        matched_graphs = self._prepare_graphs(graph_features).select(
            torch.arange(count, device=image_features.binding_keys.device)[:, None]
        )
        slots, attentions = self._bind(
            image_features.binding_keys, image_features.binding_values, matched_graphs, output_attentions
        )
        if attentions is not None:
            attentions = tuple(attention[:, :, 0] for attention in attentions)
        return slots[:, 0], attentions

    def binding_attention(
        self, image_features: OCCLIPImageFeatures, graph_features: OCCLIPGraphFeatures
    ) -> tuple[torch.Tensor, ...]:
        """Query-softmax attention of each binding layer for the pairs (image k, caption k): `[B, H, Q, N]` per layer.

        A convenience over `forward(..., output_attentions=True).binding_attentions`, equal to its matched pairs
        `[k, :, k]` but computed for those pairs only (`bind_pairs`). Queries are the caption's nodes then the
        default queries; reshape `N` to the patch grid for binding maps.
        """
        return self.bind_pairs(image_features, graph_features, output_attentions=True)[1]

    def rerank(
        self,
        image_features: OCCLIPImageFeatures,
        graph_features: OCCLIPGraphFeatures,
        global_logits: torch.Tensor,
        top_k: int = 50,
        global_weight: float = 0.0,
        query: str = "text",
    ) -> OCCLIPRerankOutput:
        """Rescore a global-CLIP shortlist with OC-CLIP: `z_oc + global_weight * z_global` over the top-k.

        Args:
            global_logits: first-stage similarities, `[T, I]` for `query="text"` (captions retrieve images) or
                `[I, T]` for `query="image"`; any CLIP works (e.g. the original pretrained one, kept frozen).
            top_k: shortlist length per query.
        """
        if query not in ("text", "image"):
            raise ValueError(f"query must be 'text' or 'image', got {query!r}.")
        num_images, num_captions = image_features.binding_keys.shape[0], graph_features.num_captions
        expected = (num_captions, num_images) if query == "text" else (num_images, num_captions)
        if not isinstance(global_logits, torch.Tensor) or tuple(global_logits.shape) != expected:
            shape = tuple(global_logits.shape) if isinstance(global_logits, torch.Tensor) else type(global_logits)
            raise ValueError(f"global_logits has shape {shape}, expected {expected} for query={query!r}.")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}.")
        top_k = min(top_k, global_logits.shape[1])
        shortlist_global, candidates = global_logits.topk(top_k, dim=1)
        queries = torch.arange(global_logits.shape[0], device=candidates.device)[:, None].expand_as(candidates)
        if query == "text":
            image_index, text_index = candidates.flatten(), queries.flatten()
        else:
            image_index, text_index = queries.flatten(), candidates.flatten()
        structured = self.score_pairs(image_features, graph_features, image_index, text_index).view_as(candidates)
        fused = structured + global_weight * shortlist_global.to(structured.dtype)
        fused, order = fused.sort(dim=1, descending=True)
        return OCCLIPRerankOutput(
            indices=candidates.gather(1, order),
            scores=fused,
            structured_logits=structured.gather(1, order),
            global_logits=shortlist_global.gather(1, order),
        )

    # ------------------------------------------------------------------ losses

    def relation_negatives(
        self, text_features: OCCLIPGraphFeatures
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Negative graphs with the same nodes: `[T, K, P]` subject/object indices and a `[T, K]` validity mask.

        One negative per relation (up to `rel_num_swap_negatives`) swaps that relation's subject and object; then
        `rel_num_reassign_negatives` cyclic shifts of the valid nodes move every relation to other nodes.
        Deterministic, so every process and every replay builds the same negatives. A negative whose relation
        triples equal the positive's (e.g. the swap of a symmetric pair stated both ways) is dropped.
        """
        subject = text_features.relation_subject_index
        obj = text_features.relation_object_index
        relation_mask = text_features.relation_mask
        node_mask = text_features.node_mask
        predicate = text_features.relation_predicate_id
        num_captions, num_relations = subject.shape
        device = subject.device
        subjects, objects, valid = [], [], []
        for k in range(self.config.rel_num_swap_negatives):
            if k >= num_relations:
                break
            swap = torch.arange(num_relations, device=device) == k
            subjects.append(torch.where(swap, obj, subject))
            objects.append(torch.where(swap, subject, obj))
            valid.append(relation_mask[:, k])
        count = node_mask.sum(-1, keepdim=True)
        rank = node_mask.long().cumsum(-1) - 1
        valid_positions = torch.argsort((~node_mask).long(), dim=-1, stable=True)
        for shift in range(1, self.config.rel_num_reassign_negatives + 1):
            subjects.append(valid_positions.gather(1, (rank.gather(1, subject) + shift) % count))
            objects.append(valid_positions.gather(1, (rank.gather(1, obj) + shift) % count))
            valid.append(relation_mask.any(-1) & (count[:, 0] > 1) & (shift % count[:, 0] != 0))
        if not subjects:
            empty = torch.zeros(num_captions, 0, num_relations, dtype=torch.long, device=device)
            return empty, empty, torch.zeros(num_captions, 0, dtype=torch.bool, device=device)
        subjects, objects, valid = torch.stack(subjects, 1), torch.stack(objects, 1), torch.stack(valid, 1)
        subjects = torch.where(relation_mask[:, None], subjects, 0)
        objects = torch.where(relation_mask[:, None], objects, 0)
        # match[t, k, j, i]: negative relation j of graph k equals positive relation i (endpoints and predicate).
        match = (
            (subjects[..., :, None] == subject[:, None, None, :])
            & (objects[..., :, None] == obj[:, None, None, :])
            & (predicate[:, None, :, None] == predicate[:, None, None, :])
            & relation_mask[:, None, None, :]
        ).any(-1)
        same_as_positive = (match | ~relation_mask[:, None, :]).all(-1)
        return subjects, objects, valid & ~same_as_positive

    def relation_loss_terms(
        self, image_features: OCCLIPImageFeatures, text_features: OCCLIPGraphFeatures
    ) -> torch.Tensor:
        """Local graph contrastive loss per usable (image, graph) pair, `[n]`: the pair against its own
        relation-perturbed graphs (pairs whose graph has no valid negative are left out)."""
        subjects, objects, valid = self.relation_negatives(text_features)
        usable = valid.any(-1)
        if not bool(usable.any()):
            return image_features.binding_keys.new_zeros(0) * self.logit_scale
        index = usable.nonzero().flatten()
        text = self._prepare_graphs(text_features).select(index[:, None])  # [n, 1, ...]
        slots, _ = self._bind(image_features.binding_keys[index], image_features.binding_values[index], text)
        objects_terms = self.similarity.object_terms(slots, text)  # [n, 1, M]
        positive = self.similarity.combine(
            objects_terms,
            text.node_mask,
            self.similarity.relation_terms(slots, text, text.subject_index, text.object_index),
            text.relation_mask,
        )  # [n, 1]
        negative_relations = self.similarity.relation_terms(
            slots, text, subjects[index][:, None], objects[index][:, None]
        )  # [n, 1, K, P]
        num_negatives = negative_relations.shape[2]
        negative = self.similarity.combine(
            objects_terms[:, :, None].expand(-1, -1, num_negatives, -1),
            text.node_mask[:, :, None].expand(-1, -1, num_negatives, -1),
            negative_relations,
            text.relation_mask[:, :, None].expand(-1, -1, num_negatives, -1),
        )  # [n, 1, K]
        logits = torch.cat([positive[..., None], negative], dim=-1)[:, 0] * self.clamped_logit_scale()
        logits = logits.masked_fill(
            ~torch.cat([torch.ones_like(valid[index, :1]), valid[index]], dim=1), float("-inf")
        )
        return -logits.log_softmax(dim=-1)[:, 0]

    def loss_from_features(
        self,
        image_features: OCCLIPImageFeatures,
        text_features: OCCLIPGraphFeatures,
        logits_per_image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`(loss, loss_itc, loss_rel)` of one process's batch, image k paired with caption k: `occlip_loss` over
        `score(image_features, text_features)` (or the given `logits_per_image`) and `relation_loss_terms`.
        Training over several processes uses `training.losses.OCCLIPLoss`, which calls the same functions on the
        gathered features."""
        num_images = image_features.binding_keys.shape[0]
        if text_features.num_captions != num_images:
            raise ValueError(
                f"the loss pairs image k with caption k, but got {num_images} images and "
                f"{text_features.num_captions} captions."
            )
        per_image = self.score(image_features, text_features) if logits_per_image is None else logits_per_image
        weight = self.config.rel_loss_weight
        terms = self.relation_loss_terms(image_features, text_features) if weight else None
        return occlip_loss(per_image, per_image.t(), terms, rel_loss_weight=weight)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        node_input_ids: torch.Tensor | None = None,
        node_attention_mask: torch.Tensor | None = None,
        node_mask: torch.Tensor | None = None,
        relation_input_ids: torch.Tensor | None = None,
        relation_attention_mask: torch.Tensor | None = None,
        relation_mask: torch.Tensor | None = None,
        relation_subject_index: torch.Tensor | None = None,
        relation_object_index: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_loss: bool | None = None,
        return_logits: bool = True,
        interpolate_pos_encoding: bool = False,
        validate_inputs: bool = True,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | OCCLIPOutput:
        """Structured logits for every (image, scene graph) pair and, with `return_loss=True`, the OC-CLIP loss
        `L_itc + rel_loss_weight * L_rel` (image k is paired with caption k).

        Args:
            pixel_values, interpolate_pos_encoding: as for `get_image_features`.
            node_input_ids ... relation_object_index, validate_inputs: the scene graphs, as for `get_graph_features`.
            input_ids, attention_mask, position_ids: optional plain tokenized captions; when given, `text_embeds`
                and `text_model_output` hold their global embedding (`get_text_features`), as in `CLIPOutput`.
            return_loss: also compute the loss. return_logits: `False` skips the logit grid (trainers that compute
                the loss over gathered features need the features only).
            output_attentions: the vision (and caption) tower attentions, and `binding_attentions` of every pair.
            output_hidden_states: the vision (and caption) tower hidden states.
        """
        _check_kwargs(kwargs, "OCCLIPModel.forward")
        if pixel_values is None or node_input_ids is None:
            raise ValueError("OCCLIPModel.forward needs pixel_values and node_input_ids.")
        output_attentions = _output_flag(self.config, "output_attentions", kwargs.get("output_attentions"))
        output_flags = {name: _output_flag(self.config, name, kwargs.get(name)) for name in _OUTPUT_FLAGS}
        image_features = self.get_image_features(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **output_flags
        )
        graph_features = self.get_graph_features(
            node_input_ids,
            node_attention_mask,
            node_mask,
            relation_input_ids,
            relation_attention_mask,
            relation_mask,
            relation_subject_index,
            relation_object_index,
            validate_inputs=validate_inputs,
            return_dict=True,
        )
        text_outputs = text_embeds = None
        if input_ids is not None:
            text_outputs = self.get_text_features(
                input_ids, attention_mask, position_ids, return_dict=True, **output_flags
            )
            text_embeds = nn.functional.normalize(text_outputs.pooler_output, dim=-1)
        logits_per_image = binding_attentions = None
        if return_logits or output_attentions:
            self._check_features(image_features, graph_features)
            similarity, binding_attentions = self._score_grid(image_features, graph_features, output_attentions)
            logits_per_image = similarity * self.clamped_logit_scale() if return_logits else None
        loss = loss_itc = loss_rel = None
        if return_loss:
            loss, loss_itc, loss_rel = self.loss_from_features(
                image_features, graph_features, logits_per_image=logits_per_image
            )
        return OCCLIPOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=None if logits_per_image is None else logits_per_image.t(),
            loss_itc=loss_itc,
            loss_rel=loss_rel,
            text_embeds=text_embeds,
            image_embeds=nn.functional.normalize(image_features.pooler_output, dim=-1),
            text_model_output=text_outputs,
            image_features=image_features,
            graph_features=graph_features,
            binding_attentions=binding_attentions,
        )


class OCCLIPVisionModel(CLIPVisionModel):
    """OC-CLIP's (fine-tuned) image tower alone: a CLIP ViT usable as a vision backbone (e.g. in LLaVA).

    `OCCLIPVisionModel.from_pretrained(occlip_folder)` takes the image tower out of a full OC-CLIP checkpoint.
    """

    config: OCCLIPVisionConfig
    main_input_name = "pixel_values"

    def initialize_weights(self):
        """Every module through `_init_weights`, as transformers does for its own models (see
        `_initialize_every_module`)."""
        _initialize_every_module(self)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        """CLIP's vision forward, with `pixel_values` and keyword arguments checked first (as `CLOCVisionModel`)."""
        _check_kwargs(kwargs, "OCCLIPVisionModel.forward")
        _check_pixel_values(pixel_values, self.config, interpolate_pos_encoding)
        return super().forward(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )

    def clip_vision_config(self) -> CLIPVisionConfig:
        """This tower's fields as a stock `CLIPVisionConfig` (without CLOC's `prompter_config`: no remote code
        needed)."""
        fields = {
            k: v for k, v in self.config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")
        }
        fields.pop("prompter_config", None)
        return CLIPVisionConfig(**fields)

    def clip_state_dict(self) -> dict[str, torch.Tensor]:
        """The tower's weights under `CLIPVisionModel`'s names (without CLOC's Prompter)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("prompter.")}

    def export_clip_vision(self, folder, image_processor=None) -> None:
        """Write a plain `clip_vision_model` checkpoint (`vision_model.*` keys) that `CLIPVisionModel.from_pretrained`
        loads in code that hard-codes it (original LLaVA), with a preprocessor_config.json: `image_processor`'s, else
        a `CLIPImageProcessor` at the tower's image size with CLIP's normalisation."""
        clip = CLIPVisionModel(self.clip_vision_config())
        clip.load_state_dict(self.clip_state_dict())
        clip.save_pretrained(folder)
        if image_processor is None:
            # Original LLaVA calls CLIPImageProcessor.from_pretrained(tower) with no fallback.
            size = self.config.image_size
            image_processor = CLIPImageProcessorPil(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            )
        image_processor.save_pretrained(folder)


class OCCLIPTextModel(CLIPTextModel):
    """OC-CLIP's text tower alone (a CLIP text transformer); encodes node and predicate phrases."""

    config: OCCLIPTextConfig
    main_input_name = "input_ids"

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        """`CLIPTextModel.forward`; unknown keyword arguments are an error."""
        _check_kwargs(kwargs, "OCCLIPTextModel.forward")
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True, **kwargs
        )

    def initialize_weights(self):
        """Every module through `_init_weights`, as transformers does for its own models (see
        `_initialize_every_module`)."""
        _initialize_every_module(self)


# Saved and loaded under CLIP's `vision_model.` / `text_model.` prefixes, as transformers does for CLIPVisionModel,
# so the standalone towers read full OC-CLIP checkpoints and write files CLIP-era readers understand.
register_checkpoint_conversion_mapping(
    "OCCLIPVisionModel", [PrefixChange(prefix_to_remove="vision_model")], overwrite=True
)
register_checkpoint_conversion_mapping(
    "OCCLIPTextModel", [PrefixChange(prefix_to_remove="text_model")], overwrite=True
)


__all__ = [
    "OCCLIPGraphFeatures",
    "OCCLIPImageFeatures",
    "OCCLIPModel",
    "OCCLIPOutput",
    "OCCLIPPreTrainedModel",
    "OCCLIPRerankOutput",
    "OCCLIPTextModel",
    "OCCLIPVisionModel",
]
