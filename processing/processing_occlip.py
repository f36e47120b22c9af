"""`OCCLIPProcessor`: images + scene graphs -> every tensor `OCCLIPModel.forward` takes."""

import torch
from transformers import CLIPImageProcessorPil
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.utils import logging

from .clip_tokenizer import bundled_clip_tokenizer
from .images import to_rgb_list
from .rule_parser import RuleSceneGraphParser
from .scene_graph import SceneGraph, canonicalize_scene_graph

logger = logging.get_logger(__name__)


class OCCLIPProcessorKwargs(ProcessingKwargs, total=False):
    """Keyword arguments of `OCCLIPProcessor.__call__`, per modality as in every transformers processor.

    `images_kwargs` go to the image processor as in `CLIPProcessor`. `text_kwargs` apply to the node and predicate
    phrases of the scene graphs: `padding=True` / `"longest"` pads to the longest phrase of the batch,
    `"max_length"` to `max_length`, and `truncation` cuts at `max_length`, which defaults to the processor's
    `max_phrase_length`. `padding=False` is refused: the phrases form `[captions, slots, tokens]` tables.

    return_caption_tokens (`bool`, defaults to `False`):
        With `text=`, also return the captions tokenized as `CLIPProcessor` does with the same `text_kwargs`
        (`input_ids`, `attention_mask`), which `OCCLIPModel` embeds with its global text tower (`text_embeds`,
        e.g. for reranking). Off by default: training and scoring need only the scene graphs.
    """

    return_caption_tokens: bool


class OCCLIPProcessor(ProcessorMixin):
    """Image processor (PIL backend) + CLIP tokenizer + scene-graph settings for OC-CLIP.

    `OCCLIPProcessor()` with no argument uses CLIP's 224-px image preprocessing and the CLIP tokenizer built from
    the vocabulary bundled with this package (no download).

    Args:
        image_processor: defaults to `CLIPImageProcessorPil()`.
        tokenizer: defaults to the bundled CLIP tokenizer.
        max_nodes / max_relations: graphs are truncated to these (with a warning naming the caption).
        max_phrase_length: tokens per node or predicate phrase, special tokens included.
        merge_duplicate_nodes: merge nodes with identical text in `scene_graphs=` graphs (identical queries would
            get identical slots). Parsed captions are always merged: a repeated mention is the same object.
        parser: how `text=` is parsed: `"rule"` (offline spaCy rules) or `"llm"` (a causal LM, `parser_model`,
            with the rule parser as fallback).
        parser_model: local path or Hub id of the causal LM for `parser="llm"`.

    `padding`, `truncation`, `max_length`, `text_kwargs=`, `images_kwargs=` and `return_tensors` are taken as in
    `CLIPProcessor` (see `OCCLIPProcessorKwargs`); defaults: `padding="longest"`, `truncation=True`,
    `max_length=max_phrase_length`, `return_tensors="pt"`.
    """

    valid_processor_kwargs = OCCLIPProcessorKwargs
    # Defaults below the call's own kwargs (transformers' `_merge_kwargs` order).
    text_kwargs = {"padding": "longest", "truncation": True, "return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}
    return_caption_tokens = False

    model_input_names = [
        "pixel_values",
        "node_input_ids",
        "node_attention_mask",
        "node_mask",
        "relation_input_ids",
        "relation_attention_mask",
        "relation_mask",
        "relation_subject_index",
        "relation_object_index",
    ]

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        max_nodes: int = 8,
        max_relations: int = 8,
        max_phrase_length: int = 20,
        merge_duplicate_nodes: bool = True,
        parser: str = "rule",
        parser_model: str | None = None,
        **kwargs,
    ):
        if parser not in ("rule", "llm"):
            raise ValueError(f"parser must be 'rule' or 'llm', got {parser!r}")
        if parser == "llm" and not parser_model:
            raise ValueError("parser='llm' needs parser_model (a local path or Hub id of a causal LM)")
        if max_nodes < 1 or max_relations < 0 or max_phrase_length < 3:
            raise ValueError(
                f"need max_nodes >= 1, max_relations >= 0, max_phrase_length >= 3; got {max_nodes}, "
                f"{max_relations}, {max_phrase_length}"
            )
        self.max_nodes = max_nodes
        self.max_relations = max_relations
        self.max_phrase_length = max_phrase_length
        self.merge_duplicate_nodes = merge_duplicate_nodes
        self.parser = parser
        self.parser_model = parser_model
        self._caption_parser = None
        super().__init__(
            image_processor if image_processor is not None else CLIPImageProcessorPil(),
            tokenizer if tokenizer is not None else bundled_clip_tokenizer(),
            **kwargs,
        )

    @property
    def caption_parser(self):
        """The parser `text=` goes through (built on first use)."""
        if self._caption_parser is None:
            if self.parser == "llm":
                from .llm_parser import LLMSceneGraphParser

                self._caption_parser = LLMSceneGraphParser(self.parser_model)
            else:
                self._caption_parser = RuleSceneGraphParser()
        return self._caption_parser

    def prepare_graphs(self, scene_graphs: list) -> list[SceneGraph]:
        """Validate, canonicalize (`canonicalize_scene_graph`) and truncate; errors and warnings name the caption."""
        if isinstance(scene_graphs, (dict, SceneGraph)):
            scene_graphs = [scene_graphs]
        if not isinstance(scene_graphs, (list, tuple)) or not scene_graphs:
            raise ValueError("scene_graphs must be a non-empty list of scene-graph dicts (or SceneGraph objects).")
        graphs = []
        for index, data in enumerate(scene_graphs):
            graph = canonicalize_scene_graph(
                SceneGraph.from_dict(data, caption_index=index), merge_duplicates=self.merge_duplicate_nodes
            )
            graph, truncated = graph.truncate(self.max_nodes, self.max_relations)
            if truncated:
                logger.warning(
                    f"caption {index}: scene graph truncated to {self.max_nodes} nodes / {self.max_relations} "
                    f"relations (nodes: {graph.node_texts})"
                )
            graphs.append(graph)
        return graphs

    def encode_graphs(self, graphs: list[SceneGraph], **text_kwargs) -> dict[str, torch.Tensor]:
        """Padded graph tensors; each distinct phrase is tokenized once, with `text_kwargs` (see
        `OCCLIPProcessorKwargs`; `max_length` defaults to `max_phrase_length`)."""
        padding = text_kwargs.get("padding", "longest")
        if padding in (None, False, "do_not_pad"):
            raise ValueError(
                f"padding={padding!r}: the node and predicate phrases form [captions, slots, tokens] tables, so they "
                "are padded; use padding=True (to the longest phrase) or 'max_length'"
            )
        text_kwargs = {
            **text_kwargs,
            "padding": padding,
            "truncation": text_kwargs.get("truncation", True),
            "max_length": text_kwargs.get("max_length") or self.max_phrase_length,
            "return_tensors": "pt",
        }
        phrases = sorted({text for g in graphs for text in (*g.node_texts, *g.relation_texts)})
        encoded = self.tokenizer(phrases, **text_kwargs)
        row = {text: i for i, text in enumerate(phrases)}
        ids, attention = encoded["input_ids"], encoded["attention_mask"]
        pad_id = self.tokenizer.pad_token_id
        num_nodes = max(len(g.objects) for g in graphs)
        num_relations = max(len(g.relations) for g in graphs)

        def table(count: int, texts_of):
            table_ids = torch.full((len(graphs), count, ids.shape[1]), pad_id, dtype=torch.long)
            table_mask = torch.zeros((len(graphs), count, ids.shape[1]), dtype=torch.long)
            valid = torch.zeros((len(graphs), count), dtype=torch.bool)
            for b, graph in enumerate(graphs):
                texts = texts_of(graph)
                if texts:
                    rows = torch.tensor([row[t] for t in texts])
                    table_ids[b, : len(texts)] = ids[rows]
                    table_mask[b, : len(texts)] = attention[rows]
                    valid[b, : len(texts)] = True
            return table_ids, table_mask, valid

        node_ids, node_attention, node_mask = table(num_nodes, lambda g: g.node_texts)
        relation_ids, relation_attention, relation_mask = table(num_relations, lambda g: g.relation_texts)
        subject = torch.zeros((len(graphs), num_relations), dtype=torch.long)
        obj = torch.zeros_like(subject)
        for b, graph in enumerate(graphs):
            for p, relation in enumerate(graph.relations):
                subject[b, p], obj[b, p] = relation.subject, relation.object
        return {
            "node_input_ids": node_ids,
            "node_attention_mask": node_attention,
            "node_mask": node_mask,
            "relation_input_ids": relation_ids,
            "relation_attention_mask": relation_attention,
            "relation_mask": relation_mask,
            "relation_subject_index": subject,
            "relation_object_index": obj,
        }

    def __call__(
        self,
        images=None,
        text=None,
        scene_graphs=None,
        paired: bool = False,
        **kwargs: Unpack[OCCLIPProcessorKwargs],
    ) -> BatchFeature:
        """Preprocess images and captions for `OCCLIPModel`.

        Captions come as `text=` (parsed into scene graphs by the offline spaCy rule parser) or, skipping the
        parser, as `scene_graphs=` (one JSON graph per caption); both reach the same canonical form, so a caption
        and its stored graph give the same tensors. Scoring takes any numbers of images and captions; with
        `paired=True` (training, `return_loss=True`) image k must go with caption k. Images are PIL images, numpy
        arrays or torch tensors, converted by the rule of `images.py` (strings and URLs are refused). `kwargs` are
        `OCCLIPProcessorKwargs` (`padding`, `max_length`, `truncation`, `text_kwargs=`, `images_kwargs=`,
        `return_tensors`, and `return_caption_tokens` for CLIP-tokenized captions besides the graphs).
        """
        output_kwargs = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs, images_kwargs = output_kwargs["text_kwargs"], output_kwargs["images_kwargs"]
        return_tensors = text_kwargs.get("return_tensors")
        caption_tokens = output_kwargs.get("return_caption_tokens", False)
        if caption_tokens and text is None:
            raise ValueError("return_caption_tokens=True needs the captions as text= (scene_graphs= have none)")
        if images is not None:
            # The shared rule: 8-bit RGB, odd modes and extreme aspect ratios refused by name.
            images = to_rgb_list(images, **images_kwargs)
        if paired:
            num_captions = None
            if text is not None:
                num_captions = 1 if isinstance(text, str) else len(text)
            elif scene_graphs is not None:
                num_captions = 1 if isinstance(scene_graphs, (dict, SceneGraph)) else len(scene_graphs)
            num_images = None if images is None else len(images)
            if num_images is not None and num_captions is not None and num_images != num_captions:
                raise ValueError(
                    f"paired=True needs one caption per image: got {num_images} images and {num_captions} captions"
                )
        if text is not None:
            if scene_graphs is not None:
                raise ValueError("pass either text= or scene_graphs=, not both")
            scene_graphs = self.caption_parser.parse_batch([text] if isinstance(text, str) else list(text))
        if images is None and scene_graphs is None:
            raise ValueError("OCCLIPProcessor needs images=, scene_graphs= or both.")
        data = {}
        if images is not None:
            data.update(self.image_processor(images, **images_kwargs))
        if scene_graphs is not None:
            data.update(self.encode_graphs(self.prepare_graphs(scene_graphs), **text_kwargs))
        if caption_tokens:
            data.update(self.tokenizer(text, **text_kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)


__all__ = ["OCCLIPProcessor", "OCCLIPProcessorKwargs"]
