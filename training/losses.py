"""Contrastive losses over the global batch, in the style of open_clip's `loss.py`: one module per model family.

Each module owns the gatherer (`training.distributed.Gatherer`, differentiable all-gather across processes) and
the choice between the global loss (every process scores the whole gathered batch) and open_clip's local loss
(each process scores its own rows against every column). The maths are the pure functions of the model files
(`modeling_occlip.modeling_occlip.occlip_loss`, `modeling_cloc.modeling_cloc.cloc_loss`), called here on the
gathered features, so `model(..., return_loss=True)` on one process and these modules cannot drift. `ClipLoss`
is transformers' `clip_loss` for `CLIPModel`, extended by the gathered batch and NegCLIP hard negatives.

On every process the returned value is such that the mean over processes, and the mean of their gradients (as
DDP takes), are the loss of the global batch and its gradient.
"""

from typing import TYPE_CHECKING

import torch
from torch import nn

from .distributed import Gatherer
from .features import FeatureBatch

if TYPE_CHECKING:  # the model files are imported where used: training plain CLIP loads neither of them
    from modeling_occlip.modeling_occlip import OCCLIPGraphFeatures, OCCLIPImageFeatures


def _own_rows(gatherer: Gatherer | None, local_loss: bool, gathered_rows: int) -> slice | None:
    """This process's block of the gathered rows when the loss is local, else None (score every row)."""
    if gatherer is None or gatherer.world_size == 1 or not local_loss:
        return None
    block = gathered_rows // gatherer.world_size
    return slice(gatherer.rank * block, (gatherer.rank + 1) * block)


def _world(gatherer: Gatherer | None) -> int:
    return 1 if gatherer is None else gatherer.world_size


def clip_contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    valid: torch.Tensor | None = None,
    negative_text_embeds: torch.Tensor | None = None,
    rows: slice | None = None,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over a whole batch of normalised embeddings `[N, D]` (transformers' `clip_loss`
    when every row is valid and there are no negatives).

    `valid` `[N]` marks real rows (others are padding). `negative_text_embeds` `[N, D]` (NegCLIP) are extra
    columns of the image-to-text softmax only. `rows` scores only those rows against every column, scaled by
    `N / len(rows)` so that the mean over processes' blocks is the loss of the batch.
    """
    count = image_embeds.shape[0]
    valid = torch.ones(count, dtype=torch.bool, device=image_embeds.device) if valid is None else valid
    rows = slice(None) if rows is None else rows
    targets = torch.arange(count, device=image_embeds.device)[rows]
    keep = valid[None, :].expand(targets.shape[0], -1).clone()
    keep[torch.arange(targets.shape[0], device=keep.device), targets] = True
    image_columns, image_keep = text_embeds, keep
    if negative_text_embeds is not None:
        image_columns = torch.cat([text_embeds, negative_text_embeds])
        image_keep = torch.cat([keep, valid[None, :].expand(targets.shape[0], -1)], dim=1)
    loss = image_embeds.new_zeros(())
    for row_side, columns, allowed in (
        (image_embeds[rows], image_columns, image_keep),
        (text_embeds[rows], image_embeds, keep),
    ):
        logits = (logit_scale * row_side @ columns.t()).masked_fill(~allowed, float("-inf"))
        per_row = nn.functional.cross_entropy(logits, targets, reduction="none")
        loss = loss + 0.5 * per_row[valid[rows]].sum()
    return loss * (count / max(1, targets.shape[0])) / valid.sum().clamp(min=1)


class ClipLoss(nn.Module):
    """CLIP's (and NegCLIP's) image-text InfoNCE over the global batch (open_clip's `ClipLoss`)."""

    def __init__(self, gatherer: Gatherer | None = None, local_loss: bool = False):
        super().__init__()
        self.gatherer, self.local_loss = gatherer, local_loss

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        negative_text_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of this process's normalised embeddings `[n, D]` paired row by row, every process's rows
        being negatives; `logit_scale` is the temperature (exponentiated, clamped)."""
        batch = FeatureBatch(
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            valid=torch.ones(image_embeds.shape[0], dtype=torch.bool, device=image_embeds.device),
            negative_text_embeds=negative_text_embeds,
        ).gather(self.gatherer)
        rows = _own_rows(self.gatherer, self.local_loss, batch["image_embeds"].shape[0])
        return clip_contrastive_loss(
            batch["image_embeds"],
            batch["text_embeds"],
            logit_scale,
            batch["valid"],
            batch["negative_text_embeds"],
            rows,
        )


class OCCLIPLoss(nn.Module):
    """OC-CLIP's structured ITC over every (image, caption) pair of the global batch plus the local `L_rel`.

    Every process needs the same batch size (the gathered binding features are not padded by rows).
    """

    # The graph fields gathered across processes. `relation_predicate_id` stays local: it only tells a process's own
    # relations apart for `relation_loss_terms`, and its ids are not comparable between processes.
    gathered_text_names = (
        "node_embeds",
        "node_mask",
        "relation_embeds",
        "relation_mask",
        "relation_subject_index",
        "relation_object_index",
    )

    def __init__(self, gatherer: Gatherer | None = None, local_loss: bool = False):
        super().__init__()
        self.gatherer, self.local_loss = gatherer, local_loss

    def _gather(self, image: "OCCLIPImageFeatures", text: "OCCLIPGraphFeatures"):
        from modeling_occlip.modeling_occlip import OCCLIPGraphFeatures, OCCLIPImageFeatures

        batch = FeatureBatch(
            binding_keys=image.binding_keys,
            binding_values=image.binding_values,
            **{name: getattr(text, name) for name in self.gathered_text_names},
        ).gather(self.gatherer)
        return (
            OCCLIPImageFeatures(binding_keys=batch["binding_keys"], binding_values=batch["binding_values"]),
            OCCLIPGraphFeatures(**{name: batch[name] for name in self.gathered_text_names}),
        )

    def forward(
        self, model, image_features: "OCCLIPImageFeatures", text_features: "OCCLIPGraphFeatures"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`(loss, loss_itc, loss_rel)` of this process's pairs (image k with caption k) against the global batch;
        `model` is the `OCCLIPModel` whose binding module scores the pairs."""
        world = _world(self.gatherer)
        count = image_features.binding_keys.shape[0]
        if text_features.num_captions != count:
            raise ValueError(
                f"the loss pairs image k with caption k, but got {count} images and {text_features.num_captions} "
                "captions."
            )
        labels = None
        if world == 1:
            per_image = model.score(image_features, text_features)
            per_text = per_image.t()
        else:
            all_images, all_texts = self._gather(image_features, text_features)
            if all_images.binding_keys.shape[0] != world * count:
                raise ValueError("every process needs the same batch size for the gathered OC-CLIP loss")
            if self.local_loss:  # this process's rows and columns against the global batch
                labels = torch.arange(count, device=image_features.binding_keys.device) + self.gatherer.rank * count
                per_image = model.score(image_features, all_texts)
                per_text = model.score(all_images, text_features).t()
            else:
                per_image = model.score(all_images, all_texts)
                per_text = per_image.t()
        weight = model.config.rel_loss_weight
        terms = total = None
        if weight:  # each process's own pairs against their relation-perturbed graphs
            terms = model.relation_loss_terms(image_features, text_features)
            total = terms.new_tensor(float(terms.numel()))
            total = total if self.gatherer is None else self.gatherer.all_reduce_sum(total)
        from modeling_occlip.modeling_occlip import occlip_loss

        return occlip_loss(per_image, per_text, terms, total, weight, labels, scored_fraction=1 / world)


class CLOCLoss(nn.Module):
    """CLOC's image-text InfoNCE plus region-text InfoNCE, box regression and (optionally) grounding attention,
    over the global batch. Every process must pass regions (possibly none valid) or none."""

    # The features `forward` takes (after `model`): what `CLOCModel.forward` returns, plus the batch's input_boxes.
    feature_names = (
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

    def __init__(self, gatherer: Gatherer | None = None, local_loss: bool = False):
        super().__init__()
        self.gatherer, self.local_loss = gatherer, local_loss

    def forward(
        self,
        model,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        region_embeds: torch.Tensor | None = None,
        region_text_embeds: torch.Tensor | None = None,
        input_boxes: torch.Tensor | None = None,
        box_mask: torch.Tensor | None = None,
        predicted_boxes: torch.Tensor | None = None,
        grounding_mask: torch.Tensor | None = None,
        region_caption_keys: torch.Tensor | None = None,
        grounding_attention_mass: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """`(loss, loss_itc, loss_region, loss_grounding, loss_grounding_attention)` from this process's outputs
        of `CLOCModel.forward` (`model` gives the temperatures and the config)."""
        valid = torch.ones(image_embeds.shape[0], dtype=torch.bool, device=image_embeds.device)
        images = FeatureBatch(image_embeds=image_embeds, text_embeds=text_embeds, image_valid=valid)
        images = images.gather(self.gatherer)
        rows = _own_rows(self.gatherer, self.local_loss, images["image_embeds"].shape[0])
        regions = region_rows = None
        if region_embeds is not None and region_text_embeds is not None:
            # Regions are flattened per process before the gather: each process's block is its valid regions.
            flat = FeatureBatch(
                {
                    "region_embeds": region_embeds[box_mask],
                    "region_text_embeds": region_text_embeds[box_mask],
                    "region_valid": torch.ones(int(box_mask.sum()), dtype=torch.bool, device=box_mask.device),
                    "region_caption_keys": None if region_caption_keys is None else region_caption_keys[box_mask],
                }
            )
            per_image = FeatureBatch(
                {
                    "box_mask": box_mask,
                    "input_boxes": input_boxes,
                    "predicted_boxes": predicted_boxes,
                    "grounding_mask": grounding_mask,
                    "grounding_attention_mass": grounding_attention_mass,
                }
            )
            regions = {**flat.gather(self.gatherer), **per_image.gather(self.gatherer)}
            region_rows = _own_rows(self.gatherer, self.local_loss, regions["region_embeds"].shape[0])
        from modeling_cloc.modeling_cloc import cloc_loss

        return cloc_loss(
            model.config,
            model.clamped_logit_scale(),
            model.clamped_region_logit_scale(),
            images["image_embeds"],
            images["text_embeds"],
            images["image_valid"],
            regions,
            rows,
            region_rows,
        )


__all__ = ["ClipLoss", "CLOCLoss", "OCCLIPLoss", "clip_contrastive_loss"]
