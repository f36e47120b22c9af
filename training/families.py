"""One object per model family (CLIP, OC-CLIP, CLOC) holding everything the trainer, the collator and the evaluation
need about it: config, model and processor classes, what a training row must carry and how rows become model
inputs, the objective (features and loss module), and how images and captions are encoded and scored.

Adding a model (e.g. a SigLIP-based variant) means writing one `ModelFamily` subclass and listing it in `FAMILIES`.
"""

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPProcessor

from modeling_cloc import CLOCConfig, CLOCModel
from modeling_occlip import OCCLIPConfig, OCCLIPModel
from modeling_occlip.modeling_occlip import OCCLIPImageFeatures
from processing import CLOCProcessor, OCCLIPProcessor
from processing.scene_graph import SceneGraph

from .data import BadSample, check_regions
from .model_card import ModelCardInfo
from .objectives import CLIPObjective, CLOCObjective, OCCLIPObjective


class ModelFamily:
    """A model family: its classes, its collation, its objective and its scoring.

    Attributes:
        name: the family's name (`--family`-like strings and `model_type`).
        config_class / model_class / processor_class: the transformers classes.
        new_module_prefixes: parameter-name prefixes of what CLIP lacks (trained alone with frozen towers, saved
            whole with LoRA).
        logit_scale_names: the model's temperature parameters (no weight decay, clamped after each step).
        has_regions: whether the model embeds and grounds regions (CLOC).
        supports_hard_negatives: whether `objective(hard_negatives=True)` exists (the NegCLIP baseline).
        needs_equal_batches: whether the gathered loss needs the same batch size on every process (so that a
            skipped bad row cannot be allowed with several processes).
        card: what the trained folder's model card says (`training.model_card`).
    """

    name: str
    config_class: type
    model_class: type
    processor_class: type
    new_module_prefixes: tuple[str, ...] = ()
    logit_scale_names: tuple[str, ...] = ("logit_scale",)
    has_regions: bool = False
    supports_hard_negatives: bool = False
    needs_equal_batches: bool = False
    card: ModelCardInfo

    # ------------------------------------------------------------------ model

    def config(self, values: dict):
        """The family's config from `--model_config` values."""
        return self.config_class(**values)

    def from_clip(self, clip: CLIPModel, values: dict):
        """The family's model initialised from a transformers `CLIPModel`, new modules set by `values`."""
        return self.model_class.from_clip(clip, **values)

    def objective(self, hard_negatives: bool = False):
        """What the trainer runs: forward arguments, features kept, loss module (`training.objectives`)."""
        if hard_negatives and not self.supports_hard_negatives:
            raise ValueError(f"hard negatives are a CLIP baseline; {self.name} trains without them")
        return self._objective

    # ------------------------------------------------------------------ collation

    def prepare_row(self, row: dict, where: str, max_regions: int | None = None) -> dict:
        """Fields of a training row the family needs beyond image and caption (`BadSample` naming the row)."""
        return {}

    def model_inputs(self, processor, prepared: list[dict]) -> dict:
        """Model inputs of the prepared rows (each with `image`, `caption` and `prepare_row`'s fields)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ scoring

    def encode_image_batch(self, model, pixel_values):
        """Image features of one batch of pixels (normalised global embeddings)."""
        return nn.functional.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)

    def join_image_features(self, parts: list):
        """`encode_image_batch` results of consecutive batches as one."""
        return torch.cat(parts)

    def encode_texts(self, model, processor, texts: list[str], device, scene_graphs: list | None = None):
        """Normalised caption embeddings."""
        tokens = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(device)
        embeds = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return nn.functional.normalize(embeds.pooler_output, dim=-1)

    def score(self, model, image_features, text_features):
        """Unscaled similarities `[I, T]`."""
        return image_features @ text_features.t()

    def pair_scores(self, model, image_features, text_features):
        """Unscaled similarity of image k with caption k, `[N]`."""
        return (image_features * text_features).sum(-1)


class CLIPFamily(ModelFamily):
    """transformers' `CLIPModel`; with hard negatives, the NegCLIP baseline."""

    name = "clip"
    config_class, model_class, processor_class = CLIPConfig, CLIPModel, CLIPProcessor
    supports_hard_negatives = True
    _objective = CLIPObjective()
    card = ModelCardInfo(
        title="CLIP",
        description="a CLIP model (transformers `CLIPModel`)",
        tags=("clip", "contrastive-learning"),
        pipeline_tag="zero-shot-image-classification",
        usage="""inputs = processor(text=["a red square", "a blue circle"], images=image, return_tensors="pt", padding=True)
with torch.no_grad():
    print(model(**inputs).logits_per_image.softmax(-1))""",
        remote_code=False,
    )

    def from_clip(self, clip: CLIPModel, values: dict):
        """The CLIP model itself (`values` must be empty: CLIP has no new modules)."""
        if values:
            raise ValueError(
                f"--model_config with --init_from sets only what CLIP lacks, and a CLIP model lacks nothing: "
                f"{sorted(values)}"
            )
        return clip

    def objective(self, hard_negatives: bool = False):
        """CLIP's objective, NegCLIP's with `hard_negatives`."""
        return CLIPObjective(hard_negatives=True) if hard_negatives else self._objective

    def model_inputs(self, processor, prepared: list[dict]) -> dict:
        """Images and captions, then (NegCLIP) one negative caption per row after all the captions."""
        texts = [p["caption"] for p in prepared] + [p["negative"] for p in prepared if "negative" in p]
        images = [p["image"] for p in prepared]
        return dict(processor(images=images, text=texts, padding=True, truncation=True, return_tensors="pt"))


class OCCLIPFamily(ModelFamily):
    """OC-CLIP: captions as scene graphs (cached in the row, else parsed), scored by the binding module."""

    name = "occlip"
    config_class, model_class, processor_class = OCCLIPConfig, OCCLIPModel, OCCLIPProcessor
    new_module_prefixes = ("binding.", "similarity.")
    needs_equal_batches = True  # the gathered binding features are not padded by rows
    _objective = OCCLIPObjective()
    card = ModelCardInfo(
        title="OC-CLIP",
        description="an OC-CLIP model: CLIP towers, a binding module that gives one visual slot per scene-graph "
        "node, and a structured object + relation similarity",
        tags=("occlip", "clip", "object-centric", "scene-graph", "compositionality"),
        # OC-CLIP scores captions through scene graphs, so the zero-shot pipeline (plain CLIP text features) does
        # not apply to it.
        pipeline_tag=None,
        usage="""# Captions are parsed into scene graphs by the processor (offline spaCy rule parser).
inputs = processor(text=["a red square", "a blue circle"], images=image, return_tensors="pt")
with torch.no_grad():
    print(model(**inputs).logits_per_image.softmax(-1))  # structured object + relation scores""",
    )

    def prepare_row(self, row: dict, where: str, max_regions: int | None = None) -> dict:
        """The row's cached `scene_graph` (checked), or None to parse the caption."""
        graph = row.get("scene_graph")
        if not (graph and graph.get("objects")):
            return {"scene_graph": None}
        try:
            SceneGraph.from_dict(graph)
        except ValueError as error:
            raise BadSample(f"{where}: malformed scene_graph ({error})") from None
        return {"scene_graph": graph}

    def model_inputs(self, processor, prepared: list[dict]) -> dict:
        """Images and scene graphs (parsed in one batch for the rows without one), image k with graph k."""
        graphs = [p["scene_graph"] for p in prepared]
        if any(g is None for g in graphs):
            captions = [p["caption"] for p, g in zip(prepared, graphs) if g is None]
            parsed = iter(processor.caption_parser.parse_batch(captions))
            graphs = [g if g is not None else next(parsed) for g in graphs]
        return dict(processor(images=[p["image"] for p in prepared], scene_graphs=graphs, paired=True))

    def encode_image_batch(self, model, pixel_values):
        """OC-CLIP's cacheable image features (binding keys and values, global embedding)."""
        return model.get_image_features(pixel_values)

    def join_image_features(self, parts: list) -> OCCLIPImageFeatures:
        """The batches' binding keys, values and global embeddings concatenated."""
        return OCCLIPImageFeatures(
            binding_keys=torch.cat([p.binding_keys for p in parts]),
            binding_values=torch.cat([p.binding_values for p in parts]),
            pooler_output=torch.cat([p.pooler_output for p in parts]),
        )

    def encode_texts(self, model, processor, texts: list[str], device, scene_graphs: list | None = None):
        """Scene-graph features of the captions (parsed), or of `scene_graphs`."""
        inputs = processor(scene_graphs=scene_graphs) if scene_graphs is not None else processor(text=texts)
        return model.get_graph_features(**{k: v.to(device) for k, v in inputs.items()})

    def score(self, model, image_features, text_features):
        """The structured similarity `s(x, G)` of every pair."""
        return model.score(image_features, text_features, scale=False)

    def pair_scores(self, model, image_features, text_features):
        """`s(x_k, G_k)` of the pairs only."""
        index = torch.arange(image_features.binding_keys.shape[0], device=image_features.binding_keys.device)
        return model.score_pairs(image_features, text_features, index, index, False)


class CLOCFamily(ModelFamily):
    """CLOC: CLIP plus region-text contrast and grounding from each row's `regions`."""

    name = "cloc"
    config_class, model_class, processor_class = CLOCConfig, CLOCModel, CLOCProcessor
    new_module_prefixes = ("prompter.", "box_head.", "roi_head.")
    logit_scale_names = ("logit_scale", "region_logit_scale")
    has_regions = True
    _objective = CLOCObjective()
    card = ModelCardInfo(
        title="CLOC",
        description="a CLOC model: CLIP towers plus a Prompter that turns image tokens and a box or region caption "
        "into a region embedding, and a box head for grounding",
        tags=("cloc", "clip", "region-level", "visual-grounding"),
        # A plain CLIP there (`AutoModelForZeroShotImageClassification`).
        pipeline_tag="zero-shot-image-classification",
        usage="""# Boxes in pixels of the original image, one list per image.
inputs = processor(
    text=["a red square", "a blue circle"], images=image, input_boxes=[[[4, 4, 40, 40]]], return_tensors="pt"
)
with torch.no_grad():
    out = model(**inputs)
print(out.logits_per_image.softmax(-1), out.region_embeds.shape)  # image-text scores, one embedding per box""",
    )

    def prepare_row(self, row: dict, where: str, max_regions: int | None = None) -> dict:
        """The row's region boxes and texts (checked), the first `max_regions` kept."""
        boxes, texts = check_regions(row.get("regions"), where)
        if max_regions is not None:
            boxes, texts = boxes[:max_regions], texts[:max_regions]
        return {"boxes": boxes, "texts": texts}

    def model_inputs(self, processor, prepared: list[dict]) -> dict:
        """Images, captions, region boxes and region captions."""
        out = processor(
            images=[p["image"] for p in prepared],
            text=[p["caption"] for p in prepared],
            input_boxes=[p["boxes"] for p in prepared],
            region_captions=[p["texts"] for p in prepared],
        )
        return dict(out)


FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (CLIPFamily(), OCCLIPFamily(), CLOCFamily())}


def get_family(family: "str | ModelFamily") -> ModelFamily:
    """The `ModelFamily` of a name (`clip`, `occlip`, `cloc`), or the object itself; `ValueError` otherwise."""
    if isinstance(family, ModelFamily):
        return family
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    return FAMILIES[family]


__all__ = ["CLIPFamily", "CLOCFamily", "FAMILIES", "ModelFamily", "OCCLIPFamily", "get_family"]
