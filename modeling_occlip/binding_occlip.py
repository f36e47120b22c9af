"""OC-CLIP's binding module and structured similarity (`docs/occlip.md` §2.1-2.2).

Everything that depends on one image only (patch keys/values, with the query and output projections folded
in) or on one caption only (queries, node/relation vectors, the text half of the relation MLPs) is computed
once; the pair-dependent part runs over a `[images, captions]` grid of pairs with large batched matmuls.

Folding is exact for the single-query-softmax attention used here:
`logits = (LN(q) W_q^T) (X~ W_k^T + b_k)^T` equals `LN(q) K'^T` with `K' = (X~ W_k^T + b_k) W_q` per head,
and `W_o (w V)` equals `w (V W_o^T)` per head, so a pair never multiplies by `W_q` or `W_o`.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_occlip import OCCLIPConfig


@dataclass
class GraphPairInputs:
    """The scene-graph side of the pair computation: per-caption tensors (queries, score vectors, relation text
    halves) computed once per caption; leading dims are `[I', T]` with `I'` 1 (shared by all images) or the images."""

    query: torch.Tensor  # [I', T, Q, d] node queries followed by default queries (before the layer norm)
    query_mask: torch.Tensor  # [I', T, Q] bool
    node_vectors: torch.Tensor  # [I', T, M, d_obj] normalised U_n E
    node_mask: torch.Tensor  # [I', T, M] bool
    relation_vectors: torch.Tensor  # [I', T, P, d_rel] normalised U_r R
    relation_mask: torch.Tensor  # [I', T, P] bool
    subject_index: torch.Tensor  # [I', T, P] long
    object_index: torch.Tensor  # [I', T, P] long
    subject_text: torch.Tensor  # [I', T, P, d] text half of f_s's first layer (bias included)
    object_text: torch.Tensor  # [I', T, P, d] text half of f_o's first layer (bias included)

    def select(self, caption_index: torch.Tensor) -> "GraphPairInputs":
        """Captions per image: `caption_index` `[I, C]` turns a shared `[1, T]` preparation into `[I, C]`."""
        return GraphPairInputs(**{name: value[0][caption_index] for name, value in self.__dict__.items()})


# The same function stands in modeling_cloc/modeling_cloc.py: each model folder must work alone as remote code.
def patch_position_features(num_patches: int, frequencies: int, device, dtype) -> torch.Tensor:
    """`[N, 2 + 4 * frequencies]` features of a square patch grid's centres, row-major: `(x, y)` in [-1, 1]
    (linear, so an attention-weighted mean of them is the attended centroid) and `sin/cos(pi k x|y)`, k = 1..F."""
    side = int(round(num_patches**0.5))
    if side * side != num_patches:
        raise ValueError(f"patch position features need a square patch grid, got {num_patches} patches")
    centres = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side * 2 - 1
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    coords = torch.stack([x.flatten(), y.flatten()], dim=-1)  # [N, 2]
    parts = [coords]
    if frequencies > 0:
        angles = math.pi * coords[:, :, None] * torch.arange(1, frequencies + 1, device=device)  # [N, 2, F]
        parts += [angles.sin().flatten(1), angles.cos().flatten(1)]
    return torch.cat(parts, dim=-1).to(dtype)


class OCCLIPSlotMLP(nn.Module):
    """Slot update MLP of a binding layer (ratio `mlp_ratio`, GELU by default)."""

    def __init__(self, config: OCCLIPConfig):
        super().__init__()
        width = config.binding_width
        hidden = int(round(width * config.binding_config.mlp_ratio))
        self.fc1 = nn.Linear(width, hidden)
        self.activation_fn = ACT2FN[config.binding_config.hidden_act]
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class OCCLIPBindingLayer(GradientCheckpointingLayer):
    """One binding layer: node queries compete (softmax over queries) for patches, then an MLP updates slots."""

    def __init__(self, config: OCCLIPConfig):
        super().__init__()
        binding = config.binding_config
        self.width = config.binding_width
        self.num_heads = binding.num_attention_heads
        self.head_dim = self.width // self.num_heads
        self.scale = self.head_dim**-0.5
        self.renormalize = binding.renormalize
        self.eps = binding.eps
        self.query_norm = nn.LayerNorm(self.width, eps=binding.layer_norm_eps)
        # A query bias adds the same value to every query's logit for a patch, which the query softmax cancels.
        self.q_proj = nn.Linear(self.width, self.width, bias=False)
        self.k_proj = nn.Linear(self.width, self.width)
        self.v_proj = nn.Linear(self.width, self.width)
        self.out_proj = nn.Linear(self.width, self.width)
        self.mlp_norm = nn.LayerNorm(self.width, eps=binding.layer_norm_eps)
        self.mlp = OCCLIPSlotMLP(config)

    def fold_image(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image keys `K'` and values `V'` `[B, H, N, d]` with `W_q`, the scale and `W_o` folded in."""
        batch, num_patches, _ = patches.shape
        keys = self.k_proj(patches).view(batch, num_patches, self.num_heads, self.head_dim)
        values = self.v_proj(patches).view(batch, num_patches, self.num_heads, self.head_dim)
        w_q = self.q_proj.weight.view(self.num_heads, self.head_dim, self.width)
        w_o = self.out_proj.weight.view(self.width, self.num_heads, self.head_dim)
        folded_keys = torch.einsum("bnhe,hed->bhnd", keys, w_q) * self.scale
        folded_values = torch.einsum("bnhe,dhe->bhnd", values, w_o)
        return folded_keys, folded_values

    def forward(
        self,
        query_input: torch.Tensor,
        slots: torch.Tensor | None,
        keys: torch.Tensor,
        values: torch.Tensor,
        query_mask: torch.Tensor,
        num_outputs: int,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Update slots for a grid of pairs.

        Args:
            query_input: `[I', T, Q, d]` pre-norm queries (`I'` is 1 when all images share the captions).
            slots: `[I, T, Q, d]` current slots, or `None` for zeros.
            keys, values: `[I, H, N, d]` folded per-image tensors of this layer.
            query_mask: `[I', T, Q]` valid queries.
            num_outputs: slots to produce (the first `num_outputs` queries; the last layer drops defaults).
        Returns:
            New slots `[I, T, num_outputs, d]` and, if asked, the query-softmax attention `[I, H, T, Q, N]`.
        """
        queries = self.query_norm(query_input)
        if queries.shape[0] == 1 and keys.shape[0] != 1:
            # Captions shared by all images: one GEMM over every image's patches.
            logits = torch.einsum("tqd,ihnd->ihtqn", queries[0], keys)
        else:
            logits = torch.einsum("itqd,ihnd->ihtqn", queries, keys)
        logits = logits.float().masked_fill(~query_mask[:, None, :, :, None], float("-inf"))
        attention = logits.softmax(dim=3).to(values.dtype)
        weights = attention[:, :, :, :num_outputs]
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + self.eps)
        update = torch.einsum("ihtqn,ihnd->itqd", weights, values) + self.out_proj.bias
        slots = update if slots is None else slots[:, :, :num_outputs] + update
        slots = slots + self.mlp(self.mlp_norm(slots))
        return slots, (attention if output_attentions else None)


class OCCLIPBindingModule(nn.Module):
    """Binds each scene-graph node to a visual slot by cross-attention from node queries to image patches."""

    def __init__(self, config: OCCLIPConfig):
        super().__init__()
        binding = config.binding_config
        width = config.binding_width
        self.slot_residual_from_query = binding.slot_residual_from_query
        self.input_proj = nn.Linear(config.vision_config.hidden_size, width)
        self.input_norm = nn.LayerNorm(width, eps=binding.layer_norm_eps)
        self.position_frequencies = binding.position_frequencies
        self.position_proj = (
            nn.Linear(2 + 4 * binding.position_frequencies, width, bias=False)
            if binding.position_frequencies >= 0
            else None
        )
        self.node_proj = nn.Linear(config.text_embed_dim, width)
        self.default_queries = nn.Parameter(torch.zeros(binding.num_default_queries, width))
        self.layers = nn.ModuleList([OCCLIPBindingLayer(config) for _ in range(binding.num_hidden_layers)])

    def encode_image(self, patch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image binding keys and values `[B, L, H, N, d]` from patch tokens `[B, N, D_v]`."""
        patches = self.input_norm(self.input_proj(patch_tokens))
        if self.position_proj is not None:
            features = patch_position_features(
                patches.shape[1], self.position_frequencies, patches.device, patches.dtype
            )
            patches = patches + self.position_proj(features)
        folded = [layer.fold_image(patches) for layer in self.layers]
        return torch.stack([k for k, _ in folded], dim=1), torch.stack([v for _, v in folded], dim=1)

    def build_queries(self, node_embeds: torch.Tensor, node_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries `[T, M + M_def, d]` (nodes first, defaults last) and their validity mask."""
        num_captions = node_embeds.shape[0]
        defaults = self.default_queries.to(node_embeds.dtype).expand(num_captions, -1, -1)
        queries = torch.cat([self.node_proj(node_embeds), defaults], dim=1)
        default_mask = node_mask.new_ones(num_captions, defaults.shape[1])
        return queries, torch.cat([node_mask, default_mask], dim=1)

    def forward(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        query: torch.Tensor,
        query_mask: torch.Tensor,
        num_nodes: int,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Slots `[I, T, M, d]` for every (image, caption) pair of the grid; default slots are dropped."""
        num_layers = len(self.layers)
        if self.slot_residual_from_query:
            slots = query.expand(keys.shape[0], -1, -1, -1)
        else:
            slots = None
        attentions = []
        for index, layer in enumerate(self.layers):
            last = index == num_layers - 1
            if self.slot_residual_from_query:
                query_input = slots
            else:
                query_input = query if slots is None else query[:, :, : slots.shape[2]] + slots
            num_outputs = num_nodes if last else query.shape[2]
            slots, attention = layer(
                query_input, slots, keys[:, index], values[:, index], query_mask, num_outputs, output_attentions
            )
            attentions.append(attention)
        return slots, (tuple(attentions) if output_attentions else None)


class OCCLIPRelationMLP(nn.Module):
    """`f_s` or `f_o`: 2-layer MLP on `[R_j ; S]` whose first layer is split into a text and a slot half."""

    def __init__(self, config: OCCLIPConfig):
        super().__init__()
        width = config.binding_width
        self.text_dim = config.text_embed_dim
        self.fc1 = nn.Linear(self.text_dim + width, width)
        self.activation_fn = ACT2FN[config.binding_config.hidden_act]
        self.fc2 = nn.Linear(width, config.binding_config.relation_score_dim)

    def text_part(self, relation_embeds: torch.Tensor) -> torch.Tensor:
        """Per-caption half of the first layer (bias included)."""
        return nn.functional.linear(relation_embeds, self.fc1.weight[:, : self.text_dim], self.fc1.bias)

    def forward(self, text_part: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        hidden = text_part + nn.functional.linear(slots, self.fc1.weight[:, self.text_dim :])
        return self.fc2(self.activation_fn(hidden))


class OCCLIPStructuredSimilarity(nn.Module):
    """`s(x, G) = (a * sum_i o_i + b * sum_j r_j) / (a * M + b * P)` over valid nodes and relations."""

    def __init__(self, config: OCCLIPConfig):
        super().__init__()
        binding = config.binding_config
        width = config.binding_width
        text_dim = config.text_embed_dim
        self.node_proj = nn.Linear(text_dim, binding.object_score_dim)
        self.slot_proj = nn.Linear(width, binding.object_score_dim)
        self.relation_proj = nn.Linear(text_dim, binding.relation_score_dim)
        self.subject_mlp = OCCLIPRelationMLP(config)
        self.object_mlp = OCCLIPRelationMLP(config)
        self.log_alpha = nn.Parameter(torch.zeros(()))
        self.log_beta = nn.Parameter(torch.zeros(()))

    def object_terms(self, slots: torch.Tensor, graphs: GraphPairInputs) -> torch.Tensor:
        """`o_i = cos(U_n E_i, U_s S_i)`, `[I, T, M]`."""
        slot_vectors = nn.functional.normalize(self.slot_proj(slots), dim=-1)
        return (slot_vectors * graphs.node_vectors).sum(-1)

    def relation_terms(
        self, slots: torch.Tensor, graphs: GraphPairInputs, subject_index: torch.Tensor, object_index: torch.Tensor
    ) -> torch.Tensor:
        """`r_j = cos(U_r R_j, f_s([R_j; S_subj]) + f_o([R_j; S_obj]))` for the given endpoints, `[I, T, ..., P]`.

        `subject_index`/`object_index` are `[I', T, P]` or, for negative graphs, `[I', T, K, P]`.
        """
        extra = subject_index.dim() - 3
        batch_shape = torch.broadcast_shapes(slots.shape[:2], subject_index.shape[:2])
        slots = slots.expand(*batch_shape, *slots.shape[2:])

        def gather(index: torch.Tensor) -> torch.Tensor:
            index = index.expand(*batch_shape, *index.shape[2:])
            flat = index.reshape(*batch_shape, -1, 1).expand(-1, -1, -1, slots.shape[-1])
            return slots.gather(2, flat).view(*index.shape, slots.shape[-1])

        def text_view(tensor: torch.Tensor) -> torch.Tensor:
            for _ in range(extra):
                tensor = tensor.unsqueeze(2)
            return tensor

        combined = self.subject_mlp(text_view(graphs.subject_text), gather(subject_index)) + self.object_mlp(
            text_view(graphs.object_text), gather(object_index)
        )
        combined = nn.functional.normalize(combined, dim=-1)
        return (combined * text_view(graphs.relation_vectors)).sum(-1)

    def combine(
        self,
        object_terms: torch.Tensor,
        node_mask: torch.Tensor,
        relation_terms: torch.Tensor,
        relation_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Weighted mean of the valid object and relation terms (padding never enters a sum)."""
        alpha, beta = self.log_alpha.exp(), self.log_beta.exp()
        object_sum = torch.where(node_mask, object_terms, torch.zeros_like(object_terms)).sum(-1)
        relation_sum = torch.where(relation_mask, relation_terms, torch.zeros_like(relation_terms)).sum(-1)
        denominator = alpha * node_mask.sum(-1) + beta * relation_mask.sum(-1)
        return (alpha * object_sum + beta * relation_sum) / denominator

    def prepare_graphs(
        self,
        binding: OCCLIPBindingModule,
        node_embeds: torch.Tensor,
        node_mask: torch.Tensor,
        relation_embeds: torch.Tensor,
        relation_mask: torch.Tensor,
        subject_index: torch.Tensor,
        object_index: torch.Tensor,
    ) -> GraphPairInputs:
        """Everything per caption that the pair computation needs, with a leading broadcast dim of 1."""
        query, query_mask = binding.build_queries(node_embeds, node_mask)
        prepared = GraphPairInputs(
            query=query,
            query_mask=query_mask,
            node_vectors=nn.functional.normalize(self.node_proj(node_embeds), dim=-1),
            node_mask=node_mask,
            relation_vectors=nn.functional.normalize(self.relation_proj(relation_embeds), dim=-1),
            relation_mask=relation_mask,
            subject_index=subject_index,
            object_index=object_index,
            subject_text=self.subject_mlp.text_part(relation_embeds),
            object_text=self.object_mlp.text_part(relation_embeds),
        )
        return GraphPairInputs(**{name: value.unsqueeze(0) for name, value in prepared.__dict__.items()})

    def forward(self, slots: torch.Tensor, graphs: GraphPairInputs) -> torch.Tensor:
        """Structured similarity `[I, T]` of every pair in the grid."""
        objects = self.object_terms(slots, graphs)
        relations = self.relation_terms(slots, graphs, graphs.subject_index, graphs.object_index)
        node_mask = graphs.node_mask.expand_as(objects)
        relation_mask = graphs.relation_mask.expand_as(relations)
        return self.combine(objects, node_mask, relations, relation_mask)
