"""What the trainer needs per model family: which forward to run, which features to keep, and the loss over them.

Features are dicts of batch-first tensors, so micro-batches can be cached and concatenated (cached-feature
accumulation) and processes can gather them (`training.distributed.FeatureGatherer`). The loss itself lives
in the model (`OCCLIPModel.loss_from_features`, `CLOCModel.loss_from_features`, `contrastive_loss` for CLIP),
so one process without a gatherer computes exactly what `model(..., return_loss=True)` computes.
"""

import torch
from transformers import CLIPModel

from modeling_cloc import CLOCModel
from modeling_cloc.modeling_cloc import contrastive_loss
from modeling_occlip import OCCLIPModel
from modeling_occlip.modeling_occlip import OCCLIPGraphFeatures, OCCLIPImageFeatures

from .distributed import pad_to_shape

# Padding for ragged dims when features of different batches are joined: masks False, predicate ids -1.
_PAD_VALUES = {"node_mask": False, "relation_mask": False, "box_mask": False, "grounding_mask": False}
_PAD_VALUES["relation_predicate_id"] = -1


def concat_features(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate feature dicts on dim 0, padding other dims to the largest (masks with False)."""
    joined = {}
    for key in parts[0]:
        tensors = [part[key] for part in parts]
        if tensors[0] is None:
            joined[key] = None
            continue
        shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
        value = _PAD_VALUES.get(key, 0)
        padded = [pad_to_shape(t, [t.shape[0], *shape[1:]], value) for t in tensors]
        joined[key] = torch.cat(padded, dim=0)
    return joined


def splice_features(cache: list[dict], index: int, fresh: dict) -> dict[str, torch.Tensor]:
    """All cached micro-batch features with micro-batch `index` replaced by `fresh` (which carries gradients)."""
    return concat_features([fresh if i == index else part for i, part in enumerate(cache)])


class CLIPObjective:
    """transformers `CLIPModel`: symmetric InfoNCE of normalised embeddings, logit scale clamped at 100.

    With `hard_negatives=True` (NegCLIP; the collator appends one negative caption per row after the batch's
    captions) the negatives are extra text columns of the image-to-text softmax over the global batch.
    """

    name = "clip"
    model_class = CLIPModel
    new_module_prefixes: tuple[str, ...] = ()
    logit_scale_names = ("logit_scale",)

    def __init__(self, hard_negatives: bool = False):
        self.hard_negatives = hard_negatives

    def forward_kwargs(self) -> dict:
        """Extra arguments of the model call that produces the features."""
        return {"return_loss": False}

    def features(self, outputs, batch=None) -> dict[str, torch.Tensor]:
        """Batch-first tensors the loss needs."""
        images, texts = outputs.image_embeds, outputs.text_embeds
        if not self.hard_negatives:
            return {"image_embeds": images, "text_embeds": texts}
        if texts.shape[0] != 2 * images.shape[0]:
            raise ValueError(
                f"hard negatives need one negative caption per image after the captions: got {texts.shape[0]} "
                f"texts for {images.shape[0]} images"
            )
        count = images.shape[0]
        return {"image_embeds": images, "text_embeds": texts[:count], "negative_text_embeds": texts[count:]}

    def loss(self, model, features, gatherer=None, local_loss=False) -> tuple[torch.Tensor, dict]:
        """`(loss, {name: value})` over the global batch."""
        scale = model.logit_scale.exp().clamp(max=100.0)
        loss = contrastive_loss(
            features["image_embeds"],
            features["text_embeds"],
            scale,
            gatherer,
            local_loss,
            hard_negatives=features.get("negative_text_embeds"),
        )
        return loss, {"loss_clip": loss.detach()}


class OCCLIPObjective:
    """OC-CLIP: structured ITC over every (image, caption) pair of the global batch plus the local L_rel."""

    name = "occlip"
    model_class = OCCLIPModel
    new_module_prefixes = ("binding.", "similarity.")
    logit_scale_names = ("logit_scale",)
    _image_keys = ("pooler_output", "binding_keys", "binding_values")
    _text_keys = tuple(OCCLIPGraphFeatures.__dataclass_fields__)

    def forward_kwargs(self) -> dict:
        """Features only: the logit grid is built by the loss, over the gathered batch."""
        return {"return_loss": False, "return_logits": False}

    def features(self, outputs, batch=None) -> dict[str, torch.Tensor]:
        """Image features (global embedding, folded binding keys/values) and scene-graph text features."""
        image, text = outputs.image_features, outputs.graph_features
        return {**{k: getattr(image, k) for k in self._image_keys}, **{k: getattr(text, k) for k in self._text_keys}}

    def loss(self, model, features, gatherer=None, local_loss=False) -> tuple[torch.Tensor, dict]:
        """`(L_itc + w L_rel, parts)`."""
        image = OCCLIPImageFeatures(**{k: features[k] for k in self._image_keys})
        text = OCCLIPGraphFeatures(**{k: features[k] for k in self._text_keys})
        loss, loss_itc, loss_rel = model.loss_from_features(image, text, gatherer=gatherer, local_loss=local_loss)
        parts = {"loss_itc": loss_itc.detach()}
        if loss_rel is not None:
            parts["loss_rel"] = loss_rel.detach()
        return loss, parts


class CLOCObjective:
    """CLOC: image-text InfoNCE plus region-text InfoNCE and box regression, weighted by regions present."""

    name = "cloc"
    model_class = CLOCModel
    new_module_prefixes = ("prompter.", "box_head.", "roi_head.")
    logit_scale_names = ("logit_scale", "region_logit_scale")
    _keys = (
        "image_embeds",
        "text_embeds",
        "region_embeds",
        "region_text_embeds",
        "input_boxes",
        "box_mask",
        "predicted_boxes",
        "grounding_mask",
        "region_caption_keys",
        "grounding_attention_mass",
    )

    def forward_kwargs(self) -> dict:
        """Features only; the loss is computed over the gathered batch."""
        return {"return_loss": False}

    def features(self, outputs, batch=None) -> dict[str, torch.Tensor]:
        """Embeddings, region features and grounding predictions (boxes come from the batch)."""
        found = {k: getattr(outputs, k, None) for k in self._keys}
        found["input_boxes"] = None if batch is None else batch.get("input_boxes")
        return found

    def loss(self, model, features, gatherer=None, local_loss=False) -> tuple[torch.Tensor, dict]:
        """`(L_CLIP + lambda (L_region + L_grounding), parts)`."""
        loss, loss_clip, loss_region, loss_grounding, loss_attention = model.loss_from_features(
            **{k: features[k] for k in self._keys}, gatherer=gatherer, local_loss=local_loss
        )
        parts = {"loss_clip": loss_clip.detach()}
        if loss_region is not None:
            parts.update(loss_region=loss_region.detach(), loss_grounding=loss_grounding.detach())
        if loss_attention is not None:
            parts["loss_grounding_attention"] = loss_attention.detach()
        return loss, parts


OBJECTIVES = {objective.name: objective for objective in (CLIPObjective(), OCCLIPObjective(), CLOCObjective())}
