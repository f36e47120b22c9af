"""OC-CLIP: object-centric binding in contrastive language-image pre-training, as a transformers model.

The towers are transformers' CLIP towers under CLIP's parameter names, so CLIP checkpoints load unchanged. A
caption is a scene graph given as padded tensors: one short text sequence per node ("red cube") and per
relation predicate ("left of"), subject/object indices per relation, and masks.
"""

from dataclasses import dataclass
from os import PathLike

import torch
from torch import nn
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, PreTrainedConfig
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
from transformers.utils import ModelOutput, logging

from .binding_occlip import OCCLIPBindingModule, OCCLIPStructuredSimilarity, PreparedText
from .configuration_occlip import OCCLIPConfig, OCCLIPTextConfig, OCCLIPVisionConfig

logger = logging.get_logger(__name__)


@dataclass
class OCCLIPImageFeatures(BaseModelOutputWithPooling):
    r"""Cacheable per-image features of OC-CLIP.

    pooler_output (`torch.Tensor` `[B, projection_dim]`): projected, unnormalised global CLIP image embedding.
    binding_keys (`torch.Tensor` `[B, L, H, N, d]`): per-layer patch keys with the binding query projection folded in.
    binding_values (`torch.Tensor` `[B, L, H, N, d]`): per-layer patch values with the output projection folded in.
    """

    binding_keys: torch.Tensor | None = None
    binding_values: torch.Tensor | None = None


@dataclass
class OCCLIPTextFeatures(ModelOutput):
    r"""Cacheable per-caption (scene-graph) features of OC-CLIP.

    node_embeds (`[T, M, D_e]`), node_mask (`[T, M]` bool), relation_embeds (`[T, P, D_e]`),
    relation_mask (`[T, P]` bool), relation_subject_index / relation_object_index (`[T, P]` long; 0 where padded),
    relation_predicate_id (`[T, P]` long): equal ids mean the same predicate text within this batch, -1 where padded.
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
    r"""Output of [`OCCLIPModel.forward`].

    loss: `loss_itc + rel_loss_weight * loss_rel` when `return_loss=True`.
    logits_per_image (`[B_i, B_t]`): `exp(t) * s(x, G)`; logits_per_text is its transpose.
    loss_itc: symmetric InfoNCE over the structured logits; loss_rel: local graph contrastive loss.
    image_embeds (`[B_i, projection_dim]`): normalised global CLIP image embeddings.
    image_features / text_features: the caches `score` consumed.
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    loss_itc: torch.Tensor | None = None
    loss_rel: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    image_features: OCCLIPImageFeatures | None = None
    text_features: OCCLIPTextFeatures | None = None


@dataclass
class OCCLIPRerankOutput(ModelOutput):
    r"""Output of [`OCCLIPModel.rerank`]: per query, the shortlisted candidates re-ordered by the fused score.

    indices (`[Q, k]` long): candidate indices (images for text queries, captions for image queries), best first.
    scores (`[Q, k]`): fused scores `z_oc + global_weight * z_global` in the same order.
    structured_logits / global_logits (`[Q, k]`): the two parts.
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

    Args:
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
        """Initialise CLIP tower weights as CLIP does, and the binding/scoring weights from `binding_config`."""
        super()._init_weights(module)
        if not isinstance(self.config, OCCLIPConfig):
            return
        std = self.config.binding_config.initializer_std(self.config.binding_width)
        factor = self.config.initializer_factor
        if isinstance(module, OCCLIPModel):
            init.normal_(module.text_projection.weight, std=module.config.text_config.hidden_size**-0.5 * factor)
            init.normal_(module.visual_projection.weight, std=module.config.vision_config.hidden_size**-0.5 * factor)
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
        elif isinstance(module, (OCCLIPBindingModule, OCCLIPStructuredSimilarity)):
            # Handled from these parents, which own parameters directly: transformers skips param-less custom
            # modules (binding layers, MLPs) during initialisation.
            for child in module.modules():
                if isinstance(child, nn.Linear):
                    init.normal_(child.weight, std=std)
                    if child.bias is not None:
                        init.zeros_(child.bias)
                elif isinstance(child, nn.LayerNorm):
                    init.ones_(child.weight)
                    init.zeros_(child.bias)
        if isinstance(module, OCCLIPBindingModule):
            init.normal_(module.default_queries, std=std)
            if module.position_proj is not None:
                # Unit scale, like the layer-normed patch features it is added to, so position is used from step 0.
                init.normal_(module.position_proj.weight, std=module.position_proj.in_features**-0.5)
        elif isinstance(module, OCCLIPStructuredSimilarity):
            log_weight = torch.log(torch.tensor(self.config.binding_config.score_weight_init)).item()
            init.constant_(module.log_alpha, log_weight)
            init.constant_(module.log_beta, log_weight)


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple, what: str) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)} ({what}).")


def _as_bool_mask(name: str, mask: torch.Tensor | None, shape: tuple, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(mask).__name__}.")
    _check_shape(name, mask, shape, "one flag per entry")
    return mask.to(device=device, dtype=torch.bool)


class OCCLIPModel(OCCLIPPreTrainedModel):
    """OC-CLIP: CLIP towers, a binding module that gives one visual slot per scene-graph node, and a structured
    similarity (object terms + relation terms) in place of the single cosine.

    Use `get_image_features` / `get_text_features` to cache each side once, `score` for all pairs, `score_pairs`
    for selected pairs and `rerank` to rescore a global-CLIP shortlist.
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
        clip_config = clip.config
        config = OCCLIPConfig(
            text_config=clip_config.text_config.to_dict(),
            vision_config=clip_config.vision_config.to_dict(),
            binding_config=binding_config,
            projection_dim=clip_config.projection_dim,
            logit_scale_init_value=float(clip.logit_scale.detach()),
            **config_kwargs,
        )
        model = cls(config)
        incompatible = model.load_state_dict(clip.state_dict(), strict=False)
        new_modules = ("binding.", "similarity.")
        unexpected = list(incompatible.unexpected_keys)
        missing = [key for key in incompatible.missing_keys if not key.startswith(new_modules)]
        if unexpected or missing:
            raise ValueError(
                f"CLIP checkpoint does not match OC-CLIP's towers: unexpected {unexpected[:5]}, missing {missing[:5]}."
            )
        return model.to(dtype=next(clip.parameters()).dtype)

    # ------------------------------------------------------------------ per-image side

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        vision = self.config.vision_config
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
        expected = (vision.num_channels, vision.image_size, vision.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}, expected [batch, {expected[0]}, {expected[1]}, "
                f"{expected[2]}] for this model (image_size={vision.image_size}); resize the images with the processor."
            )
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values holds no image.")
        if not pixel_values.is_floating_point():
            # Raw 0-255 integers would run through the towers as if normalised, giving a silently wrong answer.
            raise ValueError(
                f"pixel_values has dtype {pixel_values.dtype}; the model takes normalised float pixels (the "
                "processor's output), not raw 0-255 values."
            )

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> OCCLIPImageFeatures:
        """Per-image cache: global CLIP embedding (`pooler_output`) and folded binding keys/values."""
        self._check_pixel_values(pixel_values)
        layer = self.config.binding_config.vision_feature_layer
        vision_outputs = self.vision_model(
            pixel_values=pixel_values, output_hidden_states=layer != -1, return_dict=True, **kwargs
        )
        hidden = vision_outputs.last_hidden_state if layer == -1 else vision_outputs.hidden_states[layer]
        keys, values = self.binding.encode_image(hidden[:, 1:])  # CLS dropped: binding sees patches only
        return OCCLIPImageFeatures(
            pooler_output=self.visual_projection(vision_outputs.pooler_output),
            binding_keys=keys,
            binding_values=values,
        )

    # ------------------------------------------------------------------ per-caption side

    def _encode_phrases(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed phrases `[n, L]`; each distinct phrase runs through the text tower once.

        Returns the embeddings `[n, D_e]` and an id per phrase (equal ids = equal text).
        """
        key = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, -1))
        unique_keys, inverse = torch.unique(key, dim=0, return_inverse=True)
        first = torch.full((unique_keys.shape[0],), input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        first = first.scatter_reduce(0, inverse, torch.arange(input_ids.shape[0], device=input_ids.device), "amin")
        input_ids, attention_mask = input_ids[first], attention_mask[first]
        # Columns masked in every phrase only cost compute: causal attention and pooling at the end-of-text token
        # make the result independent of trailing padding.
        used = attention_mask.bool().any(0).nonzero()
        length = int(used.max()) + 1 if used.numel() else input_ids.shape[-1]
        outputs = self.text_model(
            input_ids=input_ids[:, :length], attention_mask=attention_mask[:, :length], return_dict=True
        )
        embeds = outputs.pooler_output
        if self.config.text_embedding_source == "projected":
            embeds = self.text_projection(embeds)
        return embeds[inverse], inverse

    def _check_phrase_tokens(self, name: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, valid) -> None:
        eos = self.config.text_config.eos_token_id
        if input_ids.shape[-1] > self.config.text_config.max_position_embeddings:
            raise ValueError(
                f"{name} has {input_ids.shape[-1]} tokens per phrase, more than the text tower's "
                f"max_position_embeddings ({self.config.text_config.max_position_embeddings})."
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.text_config.vocab_size):
            raise ValueError(
                f"{name} holds token ids outside the vocabulary [0, {self.config.text_config.vocab_size})."
            )
        if isinstance(eos, int) and eos != 2:
            has_eos = ((input_ids == eos) & attention_mask.bool()).any(-1)
            missing = (~has_eos) & valid
            if missing.any():
                caption, entry = missing.nonzero()[0].tolist()
                raise ValueError(
                    f"{name}[{caption}, {entry}] has no end-of-text token ({eos}) inside its attention mask; the text "
                    f"tower pools at that token. Tokenize phrases with the CLIP tokenizer."
                )

    def get_text_features(
        self,
        node_input_ids: torch.Tensor,
        node_attention_mask: torch.Tensor | None = None,
        node_mask: torch.Tensor | None = None,
        relation_input_ids: torch.Tensor | None = None,
        relation_attention_mask: torch.Tensor | None = None,
        relation_mask: torch.Tensor | None = None,
        relation_subject_index: torch.Tensor | None = None,
        relation_object_index: torch.Tensor | None = None,
    ) -> OCCLIPTextFeatures:
        """Per-caption cache: node and predicate embeddings of padded scene graphs, validated.

        Args:
            node_input_ids: `[T, M, L]` token ids of each node phrase ("red cube").
            node_attention_mask: `[T, M, L]`; defaults to all ones.
            node_mask: `[T, M]` valid nodes; defaults to all valid.
            relation_input_ids: `[T, P, L']` token ids of each predicate ("left of"), or `None` for no relations.
            relation_attention_mask: `[T, P, L']`; relation_mask: `[T, P]`.
            relation_subject_index / relation_object_index: `[T, P]` node index of each relation's endpoints.
        """
        if not isinstance(node_input_ids, torch.Tensor) or node_input_ids.dim() != 3:
            shape = tuple(node_input_ids.shape) if isinstance(node_input_ids, torch.Tensor) else type(node_input_ids)
            raise ValueError(f"node_input_ids must be a [captions, nodes, tokens] tensor, got {shape}.")
        if node_input_ids.dtype.is_floating_point:
            raise ValueError("node_input_ids must hold integer token ids.")
        device = node_input_ids.device
        num_captions, num_nodes, _ = node_input_ids.shape
        if num_captions == 0 or num_nodes == 0:
            raise ValueError(f"node_input_ids has shape {tuple(node_input_ids.shape)}: no caption or no node slot.")
        if node_attention_mask is None:
            node_attention_mask = torch.ones_like(node_input_ids)
        _check_shape("node_attention_mask", node_attention_mask, node_input_ids.shape, "same as node_input_ids")
        node_mask = _as_bool_mask("node_mask", node_mask, (num_captions, num_nodes), device)
        empty = (~node_mask.any(-1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"caption {empty[0]} has zero valid nodes (node_mask is all False); a graph needs a node."
            )
        self._check_phrase_tokens("node_input_ids", node_input_ids, node_attention_mask, node_mask)

        if relation_input_ids is None:
            if relation_subject_index is not None or relation_object_index is not None:
                raise ValueError("relation indices were given without relation_input_ids.")
            relation_input_ids = node_input_ids.new_zeros(num_captions, 0, 1)
            relation_attention_mask = relation_input_ids
            relation_mask = torch.zeros(num_captions, 0, dtype=torch.bool, device=device)
            relation_subject_index = relation_object_index = torch.zeros(
                num_captions, 0, dtype=torch.long, device=device
            )
        if relation_input_ids.dim() != 3 or relation_input_ids.shape[0] != num_captions:
            raise ValueError(
                f"relation_input_ids has shape {tuple(relation_input_ids.shape)}, expected [{num_captions}, relations,"
                " tokens] (one row of relations per caption of node_input_ids)."
            )
        num_relations = relation_input_ids.shape[1]
        if relation_attention_mask is None:
            relation_attention_mask = torch.ones_like(relation_input_ids)
        _check_shape(
            "relation_attention_mask", relation_attention_mask, relation_input_ids.shape, "same as relation_input_ids"
        )
        relation_mask = _as_bool_mask("relation_mask", relation_mask, (num_captions, num_relations), device)
        if relation_subject_index is None or relation_object_index is None:
            raise ValueError("relation_input_ids needs both relation_subject_index and relation_object_index.")
        for name, index in (
            ("relation_subject_index", relation_subject_index),
            ("relation_object_index", relation_object_index),
        ):
            _check_shape(name, index, (num_captions, num_relations), "one node index per relation")
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
        subject_index = torch.where(relation_mask, relation_subject_index.long(), 0)
        object_index = torch.where(relation_mask, relation_object_index.long(), 0)
        self_loops = relation_mask & (subject_index == object_index)
        if self_loops.any():
            caption, relation = self_loops.nonzero()[0].tolist()
            raise ValueError(f"caption {caption}, relation {relation}: subject and object are the same node.")
        if num_relations:
            self._check_phrase_tokens("relation_input_ids", relation_input_ids, relation_attention_mask, relation_mask)

        # Nodes and predicates share one pass through the text tower, padded to a common length.
        length = max(node_input_ids.shape[-1], relation_input_ids.shape[-1])
        pad_id = self.config.text_config.pad_token_id or 0

        def rows(ids, mask, valid):
            ids, mask = ids[valid], mask[valid]
            pad = length - ids.shape[-1]
            return nn.functional.pad(ids, (0, pad), value=pad_id), nn.functional.pad(mask, (0, pad), value=0)

        node_ids, node_attn = rows(node_input_ids, node_attention_mask, node_mask)
        rel_ids, rel_attn = rows(relation_input_ids, relation_attention_mask, relation_mask)
        embeds, phrase_ids = self._encode_phrases(torch.cat([node_ids, rel_ids]), torch.cat([node_attn, rel_attn]))
        num_valid_nodes = node_ids.shape[0]

        node_embeds = embeds.new_zeros(num_captions, num_nodes, embeds.shape[-1])
        node_embeds = node_embeds.masked_scatter(node_mask[..., None], embeds[:num_valid_nodes])
        relation_embeds = embeds.new_zeros(num_captions, num_relations, embeds.shape[-1])
        relation_embeds = relation_embeds.masked_scatter(relation_mask[..., None], embeds[num_valid_nodes:])
        predicate_id = torch.full((num_captions, num_relations), -1, dtype=torch.long, device=device)
        predicate_id[relation_mask] = phrase_ids[num_valid_nodes:]
        return OCCLIPTextFeatures(
            node_embeds=node_embeds,
            node_mask=node_mask,
            relation_embeds=relation_embeds,
            relation_mask=relation_mask,
            relation_subject_index=subject_index,
            relation_object_index=object_index,
            relation_predicate_id=predicate_id,
        )

    # ------------------------------------------------------------------ pair scoring

    def _logit_scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.config.logit_scale_max)

    def _prepare_text(self, text_features: OCCLIPTextFeatures) -> PreparedText:
        return self.similarity.prepare_text(
            self.binding,
            text_features.node_embeds,
            text_features.node_mask,
            text_features.relation_embeds,
            text_features.relation_mask,
            text_features.relation_subject_index,
            text_features.relation_object_index,
        )

    def _bind(self, keys, values, text: PreparedText, output_attentions: bool = False):
        return self.binding(
            keys, values, text.query, text.query_mask, text.node_mask.shape[-1], output_attentions=output_attentions
        )

    @staticmethod
    def _check_features(image_features: OCCLIPImageFeatures, text_features: OCCLIPTextFeatures) -> None:
        if not isinstance(image_features, OCCLIPImageFeatures) or image_features.binding_keys is None:
            raise ValueError("image_features must come from OCCLIPModel.get_image_features.")
        if not isinstance(text_features, OCCLIPTextFeatures) or text_features.node_embeds is None:
            raise ValueError("text_features must come from OCCLIPModel.get_text_features.")

    def score(
        self, image_features: OCCLIPImageFeatures, text_features: OCCLIPTextFeatures, scale: bool = True
    ) -> torch.Tensor:
        """Structured logits `[I, T]` for every (image, caption) pair, computed in chunks of `pair_chunk_size` pairs.

        With `scale=False` the unscaled structured similarity `s(x, G)` in [-1, 1] is returned.
        """
        self._check_features(image_features, text_features)
        keys, values = image_features.binding_keys, image_features.binding_values
        num_images, num_captions = keys.shape[0], text_features.num_captions
        text = self._prepare_text(text_features)
        chunk = self.config.pair_chunk_size
        caption_step = min(num_captions, chunk)
        image_step = max(1, chunk // caption_step)
        rows = []
        for i0 in range(0, num_images, image_step):
            row = []
            for t0 in range(0, num_captions, caption_step):
                part = PreparedText(**{k: v[:, t0 : t0 + caption_step] for k, v in text.__dict__.items()})
                slots, _ = self._bind(keys[i0 : i0 + image_step], values[i0 : i0 + image_step], part)
                row.append(self.similarity(slots, part))
            rows.append(torch.cat(row, dim=1))
        similarity = torch.cat(rows, dim=0)
        return similarity * self._logit_scale() if scale else similarity

    def score_pairs(
        self,
        image_features: OCCLIPImageFeatures,
        text_features: OCCLIPTextFeatures,
        image_index: torch.Tensor,
        text_index: torch.Tensor,
        scale: bool = True,
    ) -> torch.Tensor:
        """Structured logits `[n]` of the pairs `(image_index[k], text_index[k])` only.

        Pairs are grouped by image so each image's keys/values are read once per chunk, never copied per pair.
        """
        self._check_features(image_features, text_features)
        image_index = torch.as_tensor(image_index, dtype=torch.long, device=image_features.binding_keys.device)
        text_index = torch.as_tensor(text_index, dtype=torch.long, device=image_index.device)
        if image_index.shape != text_index.shape or image_index.dim() != 1:
            raise ValueError(
                f"image_index {tuple(image_index.shape)} and text_index {tuple(text_index.shape)} must be equal-length"
                " 1-D tensors."
            )
        num_images, num_captions = image_features.binding_keys.shape[0], text_features.num_captions
        if image_index.numel() and (image_index.min() < 0 or image_index.max() >= num_images):
            raise ValueError(f"image_index holds values outside [0, {num_images}).")
        if text_index.numel() and (text_index.min() < 0 or text_index.max() >= num_captions):
            raise ValueError(f"text_index holds values outside [0, {num_captions}).")
        text = self._prepare_text(text_features)
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
        first = 0
        while first < len(rows):
            width = rows[first][2]
            last = min(len(rows), first + max(1, chunk // width))
            tile = torch.tensor(rows[first:last], device=image_index.device)
            offsets = torch.arange(width, device=image_index.device)
            valid = offsets[None, :] < tile[:, 2:3]
            positions = torch.where(valid, tile[:, 1:2] + offsets, tile[:, 1:2])
            pair_ids = order[positions]  # [rows, width] pair positions, padded with each row's first pair
            part = text.select(text_index[pair_ids])
            keys = image_features.binding_keys[tile[:, 0]]
            slots, _ = self._bind(keys, image_features.binding_values[tile[:, 0]], part)
            similarity = self.similarity(slots, part)
            output = output.index_put((pair_ids[valid],), similarity[valid])
            first = last
        return output * self._logit_scale() if scale else output

    def binding_attention(
        self, image_features: OCCLIPImageFeatures, text_features: OCCLIPTextFeatures
    ) -> tuple[torch.Tensor, ...]:
        """Query-softmax attention of each binding layer for the pairs (image k, caption k): `[B, H, Q, N]` per layer.

        Queries are the caption's nodes then the default queries; reshape `N` to the patch grid for binding maps.
        """
        self._check_features(image_features, text_features)
        count = image_features.binding_keys.shape[0]
        if text_features.num_captions != count:
            raise ValueError(
                f"binding_attention pairs image k with caption k: got {count} images and "
                f"{text_features.num_captions} captions."
            )
        part = self._prepare_text(text_features).select(
            torch.arange(count, device=image_features.binding_keys.device)[:, None]
        )
        _, attentions = self._bind(image_features.binding_keys, image_features.binding_values, part, True)
        return tuple(attention[:, :, 0] for attention in attentions)

    def rerank(
        self,
        image_features: OCCLIPImageFeatures,
        text_features: OCCLIPTextFeatures,
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
        num_images, num_captions = image_features.binding_keys.shape[0], text_features.num_captions
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
        structured = self.score_pairs(image_features, text_features, image_index, text_index).view_as(candidates)
        fused = structured + global_weight * shortlist_global.to(structured.dtype)
        fused, order = fused.sort(dim=1, descending=True)
        return OCCLIPRerankOutput(
            indices=candidates.gather(1, order),
            scores=fused,
            structured_logits=structured.gather(1, order),
            global_logits=shortlist_global.gather(1, order),
        )

    # ------------------------------------------------------------------ losses

    def _relation_negatives(
        self, text_features: OCCLIPTextFeatures
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
        self, image_features: OCCLIPImageFeatures, text_features: OCCLIPTextFeatures
    ) -> torch.Tensor:
        """Local graph contrastive loss per usable (image, graph) pair, `[n]`: the pair against its own
        relation-perturbed graphs (pairs whose graph has no valid negative are left out)."""
        subjects, objects, valid = self._relation_negatives(text_features)
        usable = valid.any(-1)
        if not bool(usable.any()):
            return image_features.binding_keys.new_zeros(0) * self.logit_scale
        index = usable.nonzero().flatten()
        text = self._prepare_text(text_features).select(index[:, None])  # [n, 1, ...]
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
        logits = torch.cat([positive[..., None], negative], dim=-1)[:, 0] * self._logit_scale()
        logits = logits.masked_fill(
            ~torch.cat([torch.ones_like(valid[index, :1]), valid[index]], dim=1), float("-inf")
        )
        return -logits.log_softmax(dim=-1)[:, 0]

    def loss_from_features(
        self,
        image_features: OCCLIPImageFeatures,
        text_features: OCCLIPTextFeatures,
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
        return_loss: bool | None = None,
        return_dict: bool | None = None,
        return_logits: bool = True,
        **kwargs,
    ) -> OCCLIPOutput | tuple:
        """Structured logits for every (image, caption) pair and, with `return_loss=True`, the OC-CLIP loss
        `L_itc + rel_loss_weight * L_rel` (image k is paired with caption k). `return_logits=False` skips the
        logit grid (trainers that compute the loss over gathered features only need the features)."""
        if pixel_values is None or node_input_ids is None:
            raise ValueError("OCCLIPModel.forward needs pixel_values and node_input_ids.")
        image_features = self.get_image_features(pixel_values)
        text_features = self.get_text_features(
            node_input_ids,
            node_attention_mask,
            node_mask,
            relation_input_ids,
            relation_attention_mask,
            relation_mask,
            relation_subject_index,
            relation_object_index,
        )
        logits_per_image = self.score(image_features, text_features) if return_logits else None
        loss = loss_itc = loss_rel = None
        if return_loss:
            loss, loss_itc, loss_rel = self.loss_from_features(
                image_features, text_features, logits_per_image=logits_per_image
            )
        output = OCCLIPOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=None if logits_per_image is None else logits_per_image.t(),
            loss_itc=loss_itc,
            loss_rel=loss_rel,
            image_embeds=nn.functional.normalize(image_features.pooler_output, dim=-1),
            image_features=image_features,
            text_features=text_features,
        )
        if return_dict is False:
            return output.to_tuple()
        return output


class OCCLIPVisionModel(CLIPVisionModel):
    """OC-CLIP's (fine-tuned) image tower alone: a CLIP ViT usable as a vision backbone (e.g. in LLaVA).

    `OCCLIPVisionModel.from_pretrained(occlip_folder)` takes the image tower out of a full OC-CLIP checkpoint.
    """

    config: OCCLIPVisionConfig

    def export_clip_vision(self, folder, image_processor=None) -> None:
        """Write a plain `clip_vision_model` checkpoint (`vision_model.*` keys) that `CLIPVisionModel.from_pretrained`
        loads in code that hard-codes it (original LLaVA), with a preprocessor_config.json: `image_processor`'s, else
        a `CLIPImageProcessor` at the tower's image size with CLIP's normalisation.

        (The same method lives on `CLOCVisionModel`: each model folder stays self-contained for remote code.)
        """
        fields = {
            k: v for k, v in self.config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")
        }
        clip = CLIPVisionModel(CLIPVisionConfig(**fields))
        clip.load_state_dict(self.state_dict())
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


# Saved and loaded under CLIP's `vision_model.` / `text_model.` prefixes, as transformers does for CLIPVisionModel,
# so the standalone towers read full OC-CLIP checkpoints and write files CLIP-era readers understand.
register_checkpoint_conversion_mapping(
    "OCCLIPVisionModel", [PrefixChange(prefix_to_remove="vision_model")], overwrite=True
)
register_checkpoint_conversion_mapping(
    "OCCLIPTextModel", [PrefixChange(prefix_to_remove="text_model")], overwrite=True
)


__all__ = [
    "OCCLIPImageFeatures",
    "OCCLIPModel",
    "OCCLIPOutput",
    "OCCLIPPreTrainedModel",
    "OCCLIPRerankOutput",
    "OCCLIPTextFeatures",
    "OCCLIPTextModel",
    "OCCLIPVisionModel",
]
