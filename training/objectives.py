"""What the trainer needs per model family: which forward to run, which features to keep, and the loss over them.

Features are dicts of batch-first tensors, so micro-batches can be cached and concatenated (cached-feature
accumulation) and processes can gather them. The losses are `training.losses`' modules (open_clip style), which
own the gatherer and the local/global choice and call the model files' pure loss functions, so one process
computes exactly what `model(..., return_loss=True)` computes.
"""

import math

import torch

from .distributed import Gatherer
from .features import FeatureBatch
from .losses import ClipLoss, CLOCLoss, OCCLIPLoss

DEFAULT_LOGIT_SCALE_MAX = 100.0
"""open_clip's cap on the temperature, for models whose config has no `logit_scale_max` (transformers' CLIP)."""


def logit_scale_max(config) -> float:
    """The cap on `exp(logit_scale)`: the config's `logit_scale_max` (OC-CLIP, CLOC), else open_clip's 100."""
    return float(getattr(config, "logit_scale_max", DEFAULT_LOGIT_SCALE_MAX))


def logit_scale(model, name: str = "logit_scale") -> torch.Tensor:
    """`exp(model.<name>)` clamped at `logit_scale_max(model.config)`: the temperature the loss uses."""
    return getattr(model, name).exp().clamp(max=logit_scale_max(model.config))


def clamp_logit_scale_parameters(model, names) -> None:
    """Keep each logit-scale parameter in `[0, ln logit_scale_max]` after an optimiser step (open_clip)."""
    limit = math.log(logit_scale_max(model.config))
    with torch.no_grad():
        for name in names:
            getattr(model, name).clamp_(0, limit)


def splice_features(cache: list[dict], index: int, fresh: dict) -> dict[str, torch.Tensor]:
    """All cached micro-batch features with micro-batch `index` replaced by `fresh` (which carries gradients)."""
    return FeatureBatch.concat([fresh if i == index else part for i, part in enumerate(cache)])


class CLIPObjective:
    """transformers `CLIPModel`: symmetric InfoNCE of normalised embeddings, logit scale clamped at
    `logit_scale_max`.

    With `hard_negatives=True` (NegCLIP; the collator appends one negative caption per row after the batch's
    captions) the negatives are extra text columns of the image-to-text softmax over the global batch.
    """

    name = "clip"

    def __init__(self, hard_negatives: bool = False):
        self.hard_negatives = hard_negatives

    def forward_kwargs(self, trusted_inputs: bool = False) -> dict:
        """Extra arguments of the model call that produces the features (`trusted_inputs`: see
        `OCCLIPObjective.forward_kwargs`; CLIP has no input check to skip)."""
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

    def build_loss(self, gatherer: Gatherer | None = None, local_loss: bool = False) -> ClipLoss:
        """The loss module over the global batch."""
        return ClipLoss(gatherer, local_loss)

    def loss(self, model, features, loss_module: ClipLoss) -> tuple[torch.Tensor, dict]:
        """`(loss, {name: value})` over the global batch."""
        loss = loss_module(
            features["image_embeds"],
            features["text_embeds"],
            logit_scale(model),
            features.get("negative_text_embeds"),
        )
        return loss, {"loss_itc": loss.detach()}


class OCCLIPObjective:
    """OC-CLIP: structured ITC over every (image, caption) pair of the global batch plus the local L_rel."""

    name = "occlip"
    _image_keys = ("pooler_output", "binding_keys", "binding_values")
    _text_keys = (*OCCLIPLoss.gathered_text_names, "relation_predicate_id")

    def forward_kwargs(self, trusted_inputs: bool = False) -> dict:
        """Features only: the logit grid is built by the loss, over the gathered batch. `trusted_inputs` (batches
        made by `OCCLIPProcessor`, valid by construction) skips the scene-graph checks, whose host syncs would stall
        every step (the value checks of `OCCLIPModel.check_graph_inputs`)."""
        return {"return_loss": False, "return_logits": False, "validate_inputs": not trusted_inputs}

    def features(self, outputs, batch=None) -> dict[str, torch.Tensor]:
        """Image features (global embedding, folded binding keys/values) and scene-graph text features."""
        image, text = outputs.image_features, outputs.graph_features
        return {**{k: getattr(image, k) for k in self._image_keys}, **{k: getattr(text, k) for k in self._text_keys}}

    def build_loss(self, gatherer: Gatherer | None = None, local_loss: bool = False) -> OCCLIPLoss:
        """The loss module over the global batch."""
        return OCCLIPLoss(gatherer, local_loss)

    def loss(self, model, features, loss_module: OCCLIPLoss) -> tuple[torch.Tensor, dict]:
        """`(L_itc + w L_rel, parts)`."""
        # Imported here: training plain CLIP loads neither OC-CLIP's nor CLOC's model file.
        from modeling_occlip.modeling_occlip import OCCLIPGraphFeatures, OCCLIPImageFeatures

        image = OCCLIPImageFeatures(**{k: features[k] for k in self._image_keys})
        text = OCCLIPGraphFeatures(**{k: features[k] for k in self._text_keys})
        loss, loss_itc, loss_rel = loss_module(model, image, text)
        parts = {"loss_itc": loss_itc.detach()}
        if loss_rel is not None:
            parts["loss_rel"] = loss_rel.detach()
        return loss, parts


class CLOCObjective:
    """CLOC: image-text InfoNCE plus region-text InfoNCE and box regression, weighted by regions present."""

    name = "cloc"
    _keys = CLOCLoss.feature_names

    def forward_kwargs(self, trusted_inputs: bool = False) -> dict:
        """Features only; the loss is computed over the gathered batch (`trusted_inputs`: see
        `OCCLIPObjective.forward_kwargs`; CLOC's box checks run without host syncs, so there is nothing to skip)."""
        return {"return_loss": False}

    def features(self, outputs, batch=None) -> dict[str, torch.Tensor]:
        """Embeddings, region features and grounding predictions (boxes come from the batch)."""
        found = {k: getattr(outputs, k, None) for k in self._keys}
        found["input_boxes"] = None if batch is None else batch.get("input_boxes")
        return found

    def build_loss(self, gatherer: Gatherer | None = None, local_loss: bool = False) -> CLOCLoss:
        """The loss module over the global batch."""
        return CLOCLoss(gatherer, local_loss)

    def loss(self, model, features, loss_module: CLOCLoss) -> tuple[torch.Tensor, dict]:
        """`(L_itc + lambda (L_region + L_grounding), parts)`."""
        loss, loss_itc, loss_region, loss_grounding, loss_attention = loss_module(
            model, **{k: features[k] for k in self._keys}
        )
        parts = {"loss_itc": loss_itc.detach()}
        if loss_region is not None:
            parts.update(loss_region=loss_region.detach(), loss_grounding=loss_grounding.detach())
        if loss_attention is not None:
            parts["loss_grounding_attention"] = loss_attention.detach()
        return loss, parts
