"""CLOC: contrastive localized language-image pre-training, as a transformers model (`docs/cloc.md`).

CLIP towers under CLIP's parameter names plus a light Prompter that turns the image tokens and a box (or a
region caption) into a region embedding, and a box head for grounding.
"""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import PrefixChange
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import (
    CLIPEncoder,
    CLIPModel,
    CLIPPreTrainedModel,
    CLIPTextModel,
    CLIPVisionEmbeddings,
    CLIPVisionModel,
)
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple

from .configuration_cloc import CLOCConfig, CLOCPrompterConfig, CLOCVisionConfig


@dataclass
class CLOCOutput(ModelOutput):
    r"""Output of [`CLOCModel.forward`]; the CLIP fields mean what they mean in `CLIPOutput`.

    loss (`torch.Tensor` of shape `()`, *optional*, returned when `return_loss` is `True`):
        `loss_itc + lambda * (loss_region + loss_grounding + w * loss_grounding_attention)`, lambda =
        `region_loss_weight` x the fraction of images with regions (see `CLOCModel.loss_from_features`).
    logits_per_image (`torch.Tensor` of shape `(image_batch_size, text_batch_size)`):
        Image-caption similarity scores, `exp(logit_scale)` (clamped at `logit_scale_max`) x cosine.
    logits_per_text (`torch.Tensor` of shape `(text_batch_size, image_batch_size)`):
        The transpose of `logits_per_image`.
    loss_itc (`torch.Tensor` of shape `()`, *optional*, returned when `return_loss` is `True`):
        Symmetric image-caption InfoNCE (CLIP's loss).
    loss_region (`torch.Tensor` of shape `()`, *optional*, returned with `return_loss` and region captions):
        Region-caption InfoNCE over the valid regions, near-duplicate captions left out of the softmax.
    loss_grounding (`torch.Tensor` of shape `()`, *optional*, returned with `return_loss` and region captions):
        Mean box error (`grounding_loss`) of the grounded captions against their boxes.
    image_embeds (`torch.Tensor` of shape `(image_batch_size, projection_dim)`):
        Normalised image embeddings (the projected pooled output of the vision tower).
    text_embeds (`torch.Tensor` of shape `(text_batch_size, projection_dim)`):
        Normalised caption embeddings (the projected pooled output of the text tower).
    region_embeds (`torch.Tensor` of shape `(image_batch_size, regions, projection_dim)`, *optional*, returned with
        `input_boxes`):
        Normalised region embeddings of the input boxes; zero where `box_mask` is False.
    box_mask (`torch.BoolTensor` of shape `(image_batch_size, regions)`, *optional*, returned with `input_boxes`):
        The boxes that take part (the input `box_mask`, or all True).
    region_text_embeds (`torch.Tensor` of shape `(image_batch_size, regions, projection_dim)`, *optional*, returned
        with `region_input_ids`):
        Normalised embeddings of the region captions; zero where `box_mask` is False.
    predicted_boxes (`torch.Tensor` of shape `(image_batch_size, regions, 4)`, *optional*, returned with
        `region_input_ids`):
        The box each region caption is grounded to, normalised xyxy in [0, 1].
    grounding_mask (`torch.BoolTensor` of shape `(image_batch_size, regions)`, *optional*, returned with
        `region_input_ids`):
        The captions the box loss uses (valid, and with `grounding_unique_only` unique in their image).
    region_caption_keys (`torch.LongTensor` of shape `(image_batch_size, regions)`, *optional*, returned with
        `region_input_ids`):
        Equal for captions with identical tokens, -1 where masked: what the `"exact"` near-duplicate filter compares.
    grounding_attention_mass (`torch.Tensor` of shape `(image_batch_size, regions)`, *optional*, returned with
        `region_input_ids` when `grounding_attention_loss_weight > 0`):
        The share of each caption's text-prompt attention over the image patches that falls inside its own box.
    loss_grounding_attention (`torch.Tensor` of shape `()`, *optional*, returned with `return_loss` when
        `grounding_attention_loss_weight > 0`):
        Mean `-log grounding_attention_mass` over the grounding targets.
    region_attentions (`tuple(torch.Tensor)`, *optional*, returned with `input_boxes` when `output_attentions=True`
        and the Prompter embeds the regions):
        One per Prompter layer, `(image_batch_size, regions, heads, 2, 2 + 1 + patches)`: the attention of each box's
        two prompt tokens over its own prompt tokens, then the image tokens (CLS first), as
        `get_region_features(output_attentions=True).prompter_attentions`.
    grounding_attentions (`tuple(torch.Tensor)`, *optional*, returned with `region_input_ids` when
        `output_attentions=True`):
        One per Prompter layer, `(image_batch_size, regions, heads, 1, 1 + 1 + patches)`: the attention of each
        region caption's text prompt over itself, then the image tokens, as
        `ground(output_attentions=True).prompter_attentions`.
    text_model_output (`BaseModelOutputWithPooling`):
        The output of `get_text_features` (the text tower, `pooler_output` projected), with its hidden states and
        attentions when asked for.
    vision_model_output (`BaseModelOutputWithPooling`):
        The output of `get_image_features` (the vision tower, `pooler_output` projected).
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    loss_itc: torch.Tensor | None = None
    loss_region: torch.Tensor | None = None
    loss_grounding: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    region_embeds: torch.Tensor | None = None
    box_mask: torch.Tensor | None = None
    region_text_embeds: torch.Tensor | None = None
    predicted_boxes: torch.Tensor | None = None
    grounding_mask: torch.Tensor | None = None
    region_caption_keys: torch.Tensor | None = None
    grounding_attention_mass: torch.Tensor | None = None
    loss_grounding_attention: torch.Tensor | None = None
    region_attentions: tuple[torch.Tensor, ...] | None = None
    grounding_attentions: tuple[torch.Tensor, ...] | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple:
        """The set fields in order, nested outputs turned into tuples too (as `CLIPOutput.to_tuple`)."""
        return tuple(value.to_tuple() if isinstance(value, ModelOutput) else value for value in self.values())


@dataclass
class CLOCRegionOutput(ModelOutput):
    r"""Output of [`CLOCModel.get_region_features`].

    region_embeds (`torch.Tensor` of shape `(batch_size, regions, projection_dim)`):
        Normalised region embeddings of the boxes, in the joint space of the image and caption embeddings; zero where
        `box_mask` is False.
    region_hidden_states (`torch.Tensor` of shape `(batch_size, regions, vision_hidden_size)`, *optional*):
        The Prompter's pooled prompt states at the vision tower's width (what a Ferret-style MLLM projects into region
        tokens); zero where `box_mask` is False. None for `region_head="roi_align"`.
    box_mask (`torch.BoolTensor` of shape `(batch_size, regions)`):
        The boxes that were embedded (the input `box_mask`, or all True).
    prompter_attentions (`tuple(torch.Tensor)`, *optional*, returned when `output_attentions=True`; None for
        `region_head="roi_align"`):
        One per Prompter layer, `(batch_size, regions, heads, 2, 2 + 1 + patches)`: the softmax weights of each box's
        two prompt tokens over its own prompt tokens, then the image tokens (CLS first); rows sum to 1. Averaged over
        heads and prompt tokens, the image columns of the last layer are `CLOCPrompter.image_attention`. Masked boxes
        hold the attention of the full-image box that stands in for them.
    """

    region_embeds: torch.Tensor | None = None
    region_hidden_states: torch.Tensor | None = None
    box_mask: torch.Tensor | None = None
    prompter_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class CLOCGroundingOutput(ModelOutput):
    r"""Output of [`CLOCModel.ground`].

    predicted_boxes (`torch.Tensor` of shape `(batch_size, captions, 4)`):
        The box each region caption is grounded to, normalised xyxy in [0, 1] of the (processed) image.
    region_hidden_states (`torch.Tensor` of shape `(batch_size, captions, vision_hidden_size)`):
        The Prompter's pooled text-prompt states the box head reads.
    region_text_embeds (`torch.Tensor` of shape `(batch_size, captions, projection_dim)`):
        Normalised caption embeddings (the text prompts).
    prompter_attentions (`tuple(torch.Tensor)`, *optional*, returned when `output_attentions=True`):
        One per Prompter layer, `(batch_size, captions, heads, 1, 1 + 1 + patches)`: the softmax weights of each
        caption's text prompt over itself, then the image tokens (CLS first); rows sum to 1. Averaged over heads, the
        image columns of the last layer are `CLOCPrompter.image_attention` of the text prompts.
    """

    predicted_boxes: torch.Tensor | None = None
    region_hidden_states: torch.Tensor | None = None
    region_text_embeds: torch.Tensor | None = None
    prompter_attentions: tuple[torch.Tensor, ...] | None = None


def _fill_masked_boxes(boxes: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
    """Masked (padding) boxes, which may hold anything, replaced by the full image so every row stays finite."""
    return torch.where(box_mask[..., None], boxes, boxes.new_tensor([0.0, 0.0, 1.0, 1.0]))


def box_position_encoding(boxes: torch.Tensor, width: int, temperature: float) -> torch.Tensor:
    """Sinusoidal encoding of the two corners of `[..., 4]` xyxy boxes in [0, 1]: `[..., 2, width]`.

    Per axis `width / 4` frequencies `w_j = temperature^(-4j / width)`; a corner `(x, y)` is
    `[sin 2 pi x w, cos 2 pi x w, sin 2 pi y w, cos 2 pi y w]`.
    """
    quarter = width // 4
    frequencies = temperature ** (-4 * torch.arange(quarter, device=boxes.device, dtype=torch.float32) / width)
    corners = boxes.float().view(*boxes.shape[:-1], 2, 2)  # [..., corner, (x, y)]
    angles = 2 * math.pi * corners[..., None] * frequencies  # [..., 2, 2, quarter]
    x, y = angles[..., 0, :], angles[..., 1, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=-1)


# The same function stands in modeling_occlip/binding_occlip.py: each model folder must work alone as remote code.
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


def box_patch_overlap(boxes: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Fraction of each patch cell of a square grid covered by each box: `[..., N]` for `[..., 4]` xyxy in [0, 1]."""
    side = int(round(num_patches**0.5))
    edges = torch.arange(side + 1, device=boxes.device, dtype=boxes.dtype) / side
    low, high = edges[:-1], edges[1:]

    def cover(start, end):  # [..., side]: covered share of each cell along one axis
        return ((torch.minimum(end[..., None], high) - torch.maximum(start[..., None], low)) * side).clamp(0, 1)

    x, y = cover(boxes[..., 0], boxes[..., 2]), cover(boxes[..., 1], boxes[..., 3])
    return (y[..., :, None] * x[..., None, :]).flatten(-2)


class CLOCPrompterLayer(GradientCheckpointingLayer):
    """Pre-LN transformer layer whose queries attend to themselves plus (optionally) cached image keys/values."""

    def __init__(self, prompter_config: CLOCPrompterConfig, width: int):
        super().__init__()
        self.num_heads = prompter_config.num_attention_heads
        self.head_dim = width // self.num_heads
        self.norm1 = nn.LayerNorm(width, eps=prompter_config.layer_norm_eps)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=prompter_config.layer_norm_eps)
        hidden = int(round(width * prompter_config.mlp_ratio))
        self.fc1 = nn.Linear(width, hidden)
        self.activation_fn = ACT2FN[prompter_config.hidden_act]
        self.fc2 = nn.Linear(hidden, width)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).transpose(-2, -3)

    def image_keys_values(
        self, image_tokens: torch.Tensor, position: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[B, H, 1+N, d_h]` of the image tokens: computed once, shared by every prompt.
        `position` `[1+N, D]` is added after the layer norm."""
        normed = self.norm1(image_tokens)
        if position is not None:
            normed = normed + position
        return self._heads(self.k_proj(normed)), self._heads(self.v_proj(normed))

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Updated `queries` `[S, Q, D]` and, with `output_attentions`, the attention weights `[S, H, Q, Q + K]`
        (else None); the rows attend to their own rows, then to `keys`/`values` `[S, H, K, d_h]`.

        `attention_mask` (bool, True = attend, or additive float; broadcastable to `[S, H, Q, Q + K]`) restricts
        which query rows see each other and biases the image columns. `position` `[Q, D]` is added to the rows'
        keys and values after the layer norm (image rows of the full-sequence path).
        """
        normed = self.norm1(queries)
        if position is not None:
            normed = normed + position
        q, k, v = self._heads(self.q_proj(normed)), self._heads(self.k_proj(normed)), self._heads(self.v_proj(normed))
        if keys is not None:
            k, v = torch.cat([k, keys], dim=-2), torch.cat([v, values], dim=-2)
        weights = None
        if output_attentions:  # the same attention as SDPA's, with its weights kept
            logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            if attention_mask is not None:
                if attention_mask.dtype == torch.bool:
                    logits = logits.masked_fill(~attention_mask, -torch.inf)
                else:
                    logits = logits + attention_mask
            weights = logits.softmax(-1)
            attended = weights @ v
        else:
            attended = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        hidden = queries + self.out_proj(attended.transpose(-2, -3).reshape(queries.shape))
        return hidden + self.fc2(self.activation_fn(self.fc1(self.norm2(hidden)))), weights


class CLOCPrompter(nn.Module):
    """Box or text prompt + image tokens -> region hidden state `h` (`D_v`) and embedding `z` (`D`)."""

    def __init__(self, prompter_config: CLOCPrompterConfig, width: int, projection_dim: int, layer_norm_eps: float):
        super().__init__()
        self.width, self.pooling = width, prompter_config.pooling
        self.temperature = prompter_config.box_pe_temperature
        self.corner_embeddings = nn.Parameter(torch.zeros(2, width)) if prompter_config.box_corner_embeddings else None
        self.text_prompt_proj = nn.Linear(projection_dim, width)
        self.text_type_embedding = nn.Parameter(torch.zeros(width))
        self.layers = nn.ModuleList(
            [CLOCPrompterLayer(prompter_config, width) for _ in range(prompter_config.num_hidden_layers)]
        )
        self.post_layernorm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.projection = nn.Linear(width, projection_dim, bias=False)
        self.position_frequencies = prompter_config.position_frequencies
        self.position_proj = (
            nn.Linear(2 + 4 * self.position_frequencies, width, bias=False) if self.position_frequencies >= 0 else None
        )
        self.box_attention_bias_init = float(prompter_config.box_attention_bias)
        self.box_attention_scale = (
            nn.Parameter(torch.tensor(float(prompter_config.box_attention_bias)))
            if prompter_config.box_attention_bias
            else None
        )

    def box_prompts(self, boxes: torch.Tensor) -> torch.Tensor:
        """Two prompt tokens per box: `[B, R, 2, D_v]`."""
        tokens = box_position_encoding(boxes, self.width, self.temperature).to(self.projection.weight.dtype)
        return tokens + self.corner_embeddings if self.corner_embeddings is not None else tokens

    def text_prompts(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """One prompt token per region caption: `[B, R, 1, D_v]` from projected caption embeddings `[B, R, D]`."""
        normalized = nn.functional.normalize(text_embeds, dim=-1)
        return (self.text_prompt_proj(normalized) + self.text_type_embedding)[..., None, :]

    def image_position(self, num_tokens: int, dtype: torch.dtype, device) -> torch.Tensor | None:
        """`[1+N, D_v]` position added to the image tokens' keys and values (zero for CLS), or None."""
        if self.position_proj is None:
            return None
        features = patch_position_features(num_tokens - 1, self.position_frequencies, device, dtype)
        return nn.functional.pad(self.position_proj(features), (0, 0, 1, 0))

    def box_attention_bias(self, boxes: torch.Tensor, num_tokens: int, num_prompt: int) -> torch.Tensor | None:
        """Additive logits `[B, R * T_p, 1+N]` of box prompts for the image tokens (zero for CLS), or None."""
        if self.box_attention_scale is None:
            return None
        overlap = box_patch_overlap(boxes.float(), num_tokens - 1)  # [B, R, N]
        bias = nn.functional.pad(self.box_attention_scale * overlap, (1, 0))
        return bias.repeat_interleave(num_prompt, dim=1)

    def forward(
        self, prompts: torch.Tensor, image_tokens: torch.Tensor, boxes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Region hidden states `h` `[B, R, D_v]` and normalised embeddings `z` `[B, R, D]`.

        `prompts` `[B, R, T_p, D_v]`; `image_tokens` `[B, 1+N, D_v]`; `boxes` `[B, R, 4]` for box prompts (they
        then get the box attention bias, if configured). With one layer and prompt pooling only the
        prompt rows are computed: all regions of an image form one query block against image keys/values computed
        once, and a block-diagonal mask keeps each region's prompt tokens to themselves (no per-region copy).
        """
        hidden, embeds, _ = self.forward_with_attentions(prompts, image_tokens, boxes, output_attentions=False)
        return hidden, embeds

    def forward_with_attentions(
        self,
        prompts: torch.Tensor,
        image_tokens: torch.Tensor,
        boxes: torch.Tensor | None = None,
        output_attentions: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """`forward`'s `(h, z)` and, with `output_attentions`, each layer's attention of the prompt tokens from the
        same pass: a tuple (one per layer) of `[B, R, H, T_p, T_p + 1 + N]`, the softmax weights of each region's
        `T_p` prompt tokens over its own prompt tokens, then the image tokens (CLS first); each row sums to 1. Both
        paths give this one layout (the one-layer path never builds the other regions' or the image tokens' rows).
        """
        batch, regions, num_prompt, width = prompts.shape
        num_tokens = image_tokens.shape[1]
        position = self.image_position(num_tokens, image_tokens.dtype, image_tokens.device)
        bias = None if boxes is None else self.box_attention_bias(boxes, num_tokens, num_prompt)
        attentions = [] if output_attentions else None
        if self.pooling == "prompt" and len(self.layers) == 1:
            layer = self.layers[0]
            keys, values = layer.image_keys_values(image_tokens, position)  # [B, H, K, d], once per image
            region_of = torch.arange(regions, device=prompts.device).repeat_interleave(num_prompt)
            own = region_of[:, None] == region_of[None, :]
            mask = torch.cat([own, own.new_ones(own.shape[0], keys.shape[-2])], dim=1)
            if bias is not None:
                own_logits = torch.zeros_like(own, dtype=bias.dtype).masked_fill(~own, float("-inf"))
                mask = torch.cat([own_logits.expand(batch, -1, -1), bias], dim=2)[:, None].to(prompts.dtype)
            queries = prompts.reshape(batch, regions * num_prompt, width)
            rows, weights = layer(queries, keys, values, mask, output_attentions=output_attentions)
            pooled = rows.view(batch, regions, num_prompt, width).mean(dim=2)
            if output_attentions:  # [B, H, R * T_p, R * T_p + K] -> each region's own block and image columns
                heads = weights.shape[1]
                weights = weights.view(batch, heads, regions, num_prompt, -1)
                prompt_columns = weights[..., : regions * num_prompt].view(
                    batch, heads, regions, num_prompt, regions, num_prompt
                )
                own_block = torch.diagonal(prompt_columns, dim1=2, dim2=4).permute(0, 4, 1, 2, 3)  # [B, R, H, T, T]
                image_columns = weights[..., regions * num_prompt :].transpose(1, 2)  # [B, R, H, T_p, K]
                attentions.append(torch.cat([own_block, image_columns], dim=-1))
        else:
            # Full sequence per region: every layer updates image tokens too, which then depend on the prompt.
            tokens = torch.cat([prompts, image_tokens[:, None].expand(-1, regions, -1, -1)], dim=2)
            tokens = tokens.reshape(batch * regions, -1, width)
            if position is not None:
                position = nn.functional.pad(position, (0, 0, num_prompt, 0))
            mask = None
            if bias is not None:  # prompt rows: no bias among prompts, the box bias on image columns
                rows = bias.view(batch, regions, num_prompt, num_tokens).reshape(batch * regions, num_prompt, -1)
                rows = torch.cat([rows.new_zeros(batch * regions, num_prompt, num_prompt), rows], dim=2)
                image_rows = rows.new_zeros(batch * regions, num_tokens, num_prompt + num_tokens)
                mask = torch.cat([rows, image_rows], dim=1)[:, None].to(prompts.dtype)
            for layer in self.layers:
                tokens, weights = layer(
                    tokens, attention_mask=mask, position=position, output_attentions=output_attentions
                )
                if output_attentions:  # [B * R, H, T_p + K, T_p + K]: the prompt rows
                    prompt_rows = weights[:, :, :num_prompt]
                    attentions.append(prompt_rows.reshape(batch, regions, *prompt_rows.shape[1:]))
            tokens = tokens.view(batch, regions, -1, width)
            pooled = tokens[:, :, :num_prompt].mean(2) if self.pooling == "prompt" else tokens.mean(2)
        embeds = nn.functional.normalize(self.projection(self.post_layernorm(pooled)), dim=-1)
        return pooled, embeds, None if attentions is None else tuple(attentions)

    @staticmethod
    def mean_image_attention(attentions: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """`[B, R, 1+N]`: the last layer of `forward_with_attentions`' attentions over the image tokens, averaged
        over heads and the region's prompt tokens (what `image_attention` reports)."""
        last = attentions[-1]
        num_prompt = last.shape[-2]
        return last[..., num_prompt:].mean(dim=(2, 3))

    @torch.no_grad()
    def image_attention(
        self, prompts: torch.Tensor, image_tokens: torch.Tensor, boxes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of each prompt over the image tokens `[B, R, 1+N]` (CLS first), averaged over heads and the
        region's prompt tokens: the share of each region's attention row that goes to each image token (the rest
        goes to its own prompt tokens). One-layer Prompters only (the diagnostics of what a prompt reads)."""
        return self.attention_over_image(prompts, image_tokens, boxes)

    def attention_over_image(
        self, prompts: torch.Tensor, image_tokens: torch.Tensor, boxes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`image_attention` with gradients (what the grounding attention loss supervises)."""
        if len(self.layers) != 1:
            raise ValueError("image_attention reads the one-layer Prompter; this one has several layers")
        return self.mean_image_attention(self.forward_with_attentions(prompts, image_tokens, boxes)[2])

    def embed_boxes(
        self, image_tokens: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """`(h, z, attentions)` for validated boxes; masked boxes are replaced by the full image, then zeroed (their
        attentions are those of the full-image box). `attentions` as in `forward_with_attentions`, else None."""
        boxes = _fill_masked_boxes(boxes, box_mask)
        hidden, embeds, attentions = self.forward_with_attentions(
            self.box_prompts(boxes), image_tokens, boxes, output_attentions
        )
        return hidden * box_mask[..., None], embeds * box_mask[..., None], attentions


def roi_align_mean(patch_tokens: torch.Tensor, boxes: torch.Tensor, samples: int) -> torch.Tensor:
    """Mean of `samples x samples` bilinear samples of the patch grid inside each box: `[B, R, D]`.

    `patch_tokens` `[B, N, D]` (N a square grid, CLS excluded); `boxes` `[B, R, 4]` normalised xyxy of the image.
    Sample points are bin centres; the grid is read with `grid_sample` (`align_corners=False`: patch centres sit
    at `(i + 0.5) / side`).
    """
    batch, num_patches, width = patch_tokens.shape
    side = int(round(num_patches**0.5))
    if side * side != num_patches:
        raise ValueError(f"roi_align needs a square patch grid, got {num_patches} patches")
    grid = patch_tokens.transpose(1, 2).reshape(batch, width, side, side)
    steps = (torch.arange(samples, device=boxes.device, dtype=boxes.dtype) + 0.5) / samples
    x = boxes[..., 0:1] + steps * (boxes[..., 2:3] - boxes[..., 0:1])  # [B, R, S]
    y = boxes[..., 1:2] + steps * (boxes[..., 3:4] - boxes[..., 1:2])
    points = torch.stack(torch.broadcast_tensors(x[..., None, :], y[..., :, None]), dim=-1)  # [B, R, S, S, 2]
    points = (points * 2 - 1).flatten(1, 2).to(grid.dtype)  # [B, R*S, S, 2] in grid_sample's [-1, 1]
    sampled = nn.functional.grid_sample(grid, points, mode="bilinear", align_corners=False)  # [B, D, R*S, S]
    return sampled.view(batch, width, boxes.shape[1], samples * samples).mean(-1).transpose(1, 2)


class CLOCRoIHead(nn.Module):
    """RoI-align baseline region head (paper ablation): pooled patch features -> LN -> projection."""

    def __init__(self, config: CLOCConfig):
        super().__init__()
        width = config.vision_config.hidden_size
        self.samples = config.roi_align_samples
        self.norm = nn.LayerNorm(width, eps=config.vision_config.layer_norm_eps)
        self.projection = nn.Linear(width, config.projection_dim, bias=False)

    def forward(self, image_tokens: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        pooled = roi_align_mean(image_tokens[:, 1:], boxes, self.samples)
        return nn.functional.normalize(self.projection(self.norm(pooled)), dim=-1)


class CLOCBoxHead(nn.Module):
    """2-layer GELU MLP from a text-prompted region state to a box (sigmoid, normalised xyxy).

    It reads `LN(h)` through its own layer norm, so its input scale does not drift with the residual stream or
    the embedding path, and its last layer starts at zero (every box starts at the image centre, sigmoid
    unsaturated).
    """

    def __init__(self, config: CLOCConfig):
        super().__init__()
        width = config.vision_config.hidden_size
        hidden = config.prompter_config.box_head_hidden or width
        self.norm = nn.LayerNorm(width, eps=config.prompter_config.layer_norm_eps)
        self.fc1 = nn.Linear(width, hidden)
        self.activation_fn = ACT2FN[config.prompter_config.hidden_act]
        self.fc2 = nn.Linear(hidden, 4)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(self.norm(hidden)))).sigmoid()


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


# The same function stands in modeling_occlip/modeling_occlip.py: each model folder must work alone as remote code.
def _clip_config_fields(clip: CLIPModel) -> dict:
    """What a model built from `clip` takes from its config: both towers, the projection width, the logit scale."""
    return dict(
        text_config=clip.config.text_config.to_dict(),
        vision_config=clip.config.vision_config.to_dict(),
        projection_dim=clip.config.projection_dim,
        logit_scale_init_value=float(clip.logit_scale.detach()),
    )


# The same function stands in modeling_occlip/modeling_occlip.py: each model folder must work alone as remote code.
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


class CLOCPreTrainedModel(CLIPPreTrainedModel):
    """Weights initialisation and flags shared by the CLOC models."""

    config: CLOCConfig
    base_model_prefix = "cloc"
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings", "CLOCPrompter"]

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
        """CLIP towers, projections and logit scale as `CLIPModel` does; the new modules by their own rules: the
        Prompter, box head and RoI head from `prompter_config.initializer_std` (see `_init_prompter`), the box
        head's last layer at zero (every box starts at the image centre), the region logit scale from the config."""
        super()._init_weights(module)
        if not isinstance(self.config, CLOCConfig):
            return
        std = self.config.prompter_config.initializer_std(self.config.vision_config.hidden_size)
        if isinstance(module, CLOCModel):
            _init_clip_head(module, self.config)
            init.constant_(module.region_logit_scale, self.config.region_logit_scale_init_value)
        elif isinstance(module, CLOCPrompter):
            _init_prompter(module, std)
        elif isinstance(module, CLOCBoxHead):
            _init_head(module, std)
            init.zeros_(module.fc2.weight)
        elif isinstance(module, CLOCRoIHead):
            _init_head(module, std)

    def initialize_weights(self):
        """Every module through `_init_weights`, as transformers does for its own models (see
        `_initialize_every_module`)."""
        _initialize_every_module(self)


# The same function stands in modeling_occlip/modeling_occlip.py: each model folder must work alone as remote code.
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


# The same function stands in modeling_occlip/modeling_occlip.py: each model folder must work alone as remote code.
def _init_clip_head(model: nn.Module, config) -> None:
    """The projections and logit scale of a model built from a CLIP config, exactly as `CLIPModel._init_weights`."""
    factor = config.initializer_factor
    init.normal_(model.text_projection.weight, std=config.text_config.hidden_size**-0.5 * factor)
    init.normal_(model.visual_projection.weight, std=config.vision_config.hidden_size**-0.5 * factor)
    init.constant_(model.logit_scale, config.logit_scale_init_value)


# The same function stands in modeling_occlip/modeling_occlip.py: each model folder must work alone as remote code.
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


def _init_prompter(prompter: CLOCPrompter, std: float) -> None:
    """The Prompter's rule: `_init_head(std)`, prompt type and corner embeddings N(0, std), the position map at
    unit scale, the box attention scale at `prompter_config.box_attention_bias`."""
    _init_head(prompter, std)
    init.normal_(prompter.text_type_embedding, std=std)
    if prompter.position_proj is not None:
        # Unit scale, like the layer-normed tokens it is added to, so position is used from the first step.
        init.normal_(prompter.position_proj.weight, std=prompter.position_proj.in_features**-0.5)
    if prompter.box_attention_scale is not None:
        init.constant_(prompter.box_attention_scale, prompter.box_attention_bias_init)
    if prompter.corner_embeddings is not None:
        init.normal_(prompter.corner_embeddings, std=std)


def contrastive_loss(
    image_side: torch.Tensor,
    text_side: torch.Tensor,
    scale: torch.Tensor,
    valid: torch.Tensor | None = None,
    keep_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    duplicate_keys: torch.Tensor | None = None,
    rows: slice | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between normalised rows `image_side[i]` and `text_side[i]` `[N, D]` of a whole batch
    (a trainer passes the rows gathered from every process).

    `valid` `[N]` marks the rows that take part (others are padding). `keep_pairs(rows_text, all_text)` returns a
    `[r, N]` bool mask of the pairs allowed in the softmax (the matching pair always is). `duplicate_keys` `[N]`
    (int64): pairs whose keys are equal, other than the matching pair, leave both softmaxes. `rows` scores only
    those rows against every column (open_clip's local loss: a process's own rows); the value is then scaled by
    `N / len(rows)`, so that the mean over equal blocks of rows (over processes) is the loss of the whole batch.
    Returns the mean over valid rows of `(CE(image -> text) + CE(text -> image)) / 2`.
    """
    count = image_side.shape[0]
    valid = torch.ones(count, dtype=torch.bool, device=image_side.device) if valid is None else valid
    rows = slice(None) if rows is None else rows
    targets = torch.arange(count, device=image_side.device)[rows]
    rows_image, rows_text, rows_valid = image_side[rows], text_side[rows], valid[rows]
    keep = valid[None, :].expand(targets.shape[0], -1).clone()
    if keep_pairs is not None:
        keep &= keep_pairs(rows_text, text_side)
    if duplicate_keys is not None:
        keep &= duplicate_keys[rows][:, None] != duplicate_keys[None, :]
    keep[torch.arange(targets.shape[0], device=image_side.device), targets] = True
    loss = image_side.new_zeros(())
    for row_side, columns in ((rows_image, text_side), (rows_text, image_side)):
        logits = (scale * row_side @ columns.t()).masked_fill(~keep, float("-inf"))
        per_row = nn.functional.cross_entropy(logits, targets, reduction="none")
        loss = loss + 0.5 * per_row[rows_valid].sum()
    return loss * (count / max(1, targets.shape[0])) / valid.sum().clamp(min=1)


def near_duplicate_mask(caption_embeds: torch.Tensor, other_embeds: torch.Tensor, threshold: float) -> torch.Tensor:
    """`[V, V']` True where caption `other_embeds[j]` may stay in the softmax of `caption_embeds[i]`: their cosine is
    <= `threshold` (CLOC's cosine near-duplicate filter). No gradient flows through the mask."""
    with torch.no_grad():
        rows = nn.functional.normalize(caption_embeds, dim=-1)
        columns = nn.functional.normalize(other_embeds, dim=-1)
        return rows @ columns.t() <= threshold


def cloc_loss(
    config: CLOCConfig,
    logit_scale: torch.Tensor,
    region_logit_scale: torch.Tensor,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    image_valid: torch.Tensor | None = None,
    regions: dict[str, torch.Tensor] | None = None,
    rows: slice | None = None,
    region_rows: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`(loss, loss_itc, loss_region, loss_grounding, loss_grounding_attention)` of a whole batch (a trainer passes the
    features gathered from every process; `CLOCModel.loss_from_features` one process's).

    `L = L_itc + lambda (L_region + L_grounding + w L_attention)`: image-caption InfoNCE (`contrastive_loss`);
    region-caption InfoNCE over every valid region with near-duplicate captions removed from the softmax (identical
    caption keys for `region_text_filter="exact"`, cosine > threshold for `"cosine"`); mean box error
    (`grounding_loss`) over grounding targets; with w = `grounding_attention_loss_weight` > 0, the mean `-log` of
    each grounding target's attention share inside its box; lambda = `region_loss_weight` x the fraction of the
    batch's images that have regions.

    Args:
        logit_scale / region_logit_scale: the temperatures, exponentiated and clamped.
        image_embeds / text_embeds (`[N, D]`): normalised; `image_valid` `[N]` marks real rows (others padding).
        regions: `None` (no regions) or `region_embeds` / `region_text_embeds` (`[V, D]`, the batch's valid regions
            one after the other), `region_valid` (`[V]`), `region_caption_keys` (`[V]`, exact filter), and per image
            `box_mask`, `input_boxes`, `predicted_boxes`, `grounding_mask`, `grounding_attention_mass` (`[N, R, ...]`).
        rows / region_rows: score only these image rows and region rows (a process's own: open_clip's local loss),
            scaled as in `contrastive_loss`.
    """
    count = image_embeds.shape[0]
    image_valid = (
        torch.ones(count, dtype=torch.bool, device=image_embeds.device) if image_valid is None else image_valid
    )
    loss_itc = contrastive_loss(image_embeds, text_embeds, logit_scale, image_valid, rows=rows)
    if regions is None or regions.get("region_embeds") is None or regions.get("region_text_embeds") is None:
        return loss_itc, loss_itc, None, None, None
    box_mask, grounding_mask = regions["box_mask"], regions["grounding_mask"]
    if not bool(box_mask.any()):
        return loss_itc, loss_itc, None, None, None
    exact = config.region_text_filter == "exact"
    if exact and regions.get("region_caption_keys") is None:
        raise ValueError(
            "region_text_filter='exact' needs region_caption_keys (returned by forward with region_input_ids)"
        )
    threshold = config.region_text_filter_threshold
    loss_region = contrastive_loss(
        regions["region_embeds"],
        regions["region_text_embeds"],
        region_logit_scale,
        regions.get("region_valid"),
        keep_pairs=None
        if exact
        else (lambda rows_text, all_text: near_duplicate_mask(rows_text, all_text, threshold)),
        duplicate_keys=regions["region_caption_keys"] if exact else None,
        rows=region_rows,
    )
    # Local sums over the batch's counts, x the share of rows scored (as `contrastive_loss` does).
    rows = slice(None) if rows is None else rows
    share = count / max(1, len(range(count)[rows]))
    targets = grounding_mask.sum().to(image_embeds.dtype).clamp(min=1)
    scored = grounding_mask[rows]
    error = regions["predicted_boxes"][rows] - regions["input_boxes"][rows]
    error = error.abs() if config.grounding_loss == "l1" else error**2
    box_coordinates = error.shape[-1]  # x0, y0, x1, y1: the loss is the mean error per coordinate
    loss_grounding = error[scored].sum() * share / (box_coordinates * targets)
    local = loss_region + loss_grounding
    loss_attention = None
    if config.grounding_attention_loss_weight > 0:
        mass = regions.get("grounding_attention_mass")
        if mass is None:
            raise ValueError(
                "grounding_attention_loss_weight > 0 needs grounding_attention_mass (returned by forward with "
                "input_boxes and region_input_ids)"
            )
        # 1e-6 keeps -log finite for a caption that looks entirely outside its box.
        loss_attention = -torch.log(mass[rows][scored] + 1e-6).sum() * share / targets
        local = local + config.grounding_attention_loss_weight * loss_attention
    with_regions = (box_mask.any(-1) & image_valid).sum().to(image_embeds.dtype)
    weight = config.region_loss_weight * with_regions / image_valid.sum().to(image_embeds.dtype)
    return loss_itc + weight * local, loss_itc, loss_region, loss_grounding, loss_attention


def caption_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`[...]` int64 keys of token sequences `[..., L]`: equal for identical tokens (padding ignored), different
    otherwise up to a ~2^-62 collision chance. Two polynomial hashes modulo 2^31 - 1, so no product overflows."""
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    prime = 2**31 - 1
    first = torch.zeros(input_ids.shape[:-1], dtype=torch.long, device=input_ids.device)
    second = torch.zeros_like(first)
    # Padded positions leave the keys as they are, so processes that pad differently agree.
    for token, keep in zip(input_ids.long().unbind(-1), mask.unbind(-1)):
        first = torch.where(keep, (first * 1_000_003 + token + 1) % prime, first)
        second = torch.where(keep, (second * 999_983 + token + 7) % prime, second)
    return first * prime + second


def _tokens_of_layer(vision_outputs, layer: int) -> torch.Tensor:
    """Tokens of hidden-state `layer` of a vision forward (-1: the last layer, before the post-LayerNorm)."""
    return vision_outputs.last_hidden_state if layer == -1 else vision_outputs.hidden_states[layer]


def _check_boxes(
    boxes: torch.Tensor, box_mask: torch.Tensor | None, batch: int, image_size: int | None = None
) -> torch.Tensor:
    """Validated `box_mask` for normalised boxes `[batch, R, 4]`; with `image_size`, valid boxes must also be at
    least one input pixel wide and high (a thinner box covers no patch: the processor masks such boxes)."""
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != batch:
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"input_boxes has shape {shape}, expected [{batch}, regions, 4] (normalised x0, y0, x1, y1)")
    if box_mask is None:
        box_mask = torch.ones(boxes.shape[:2], dtype=torch.bool, device=boxes.device)
    if tuple(box_mask.shape) != tuple(boxes.shape[:2]):
        raise ValueError(f"box_mask has shape {tuple(box_mask.shape)}, expected {tuple(boxes.shape[:2])}")
    box_mask = box_mask.bool()
    bad = box_mask & ~(
        torch.isfinite(boxes).all(-1)
        & (boxes[..., 2] > boxes[..., 0])
        & (boxes[..., 3] > boxes[..., 1])
        & (boxes >= 0).all(-1)
        & (boxes <= 1).all(-1)
    )
    if bad.any():
        image, box = bad.nonzero()[0].tolist()
        raise ValueError(
            f"image {image}, box {box}: {boxes[image, box].tolist()} is not a normalised box with 0 <= x0 < x1 <= 1 "
            "and 0 <= y0 < y1 <= 1 (the processor normalises pixel boxes)"
        )
    if image_size is not None:
        # Tolerance: a box the processor kept as exactly one pixel must pass after float32 rounding.
        sides = (boxes[..., 2:] - boxes[..., :2]) * image_size
        thin = box_mask & (sides < 1 - 1e-3).any(-1)
        if thin.any():
            image, box = thin.nonzero()[0].tolist()
            width, height = sides[image, box].tolist()
            raise ValueError(
                f"image {image}, box {box}: {boxes[image, box].tolist()} is {width:.3g} x {height:.3g} pixels of the "
                f"{image_size}-px input; boxes must be at least one pixel wide and high. Mask it (box_mask=False) or "
                "enlarge it (the processor masks such boxes)."
            )
    return box_mask


# The same function stands in modeling_occlip/modeling_occlip.py: each model folder must work alone as remote code.
def _output_flag(config, name: str, value: bool | None) -> bool:
    """An output flag (`output_attentions`, ...) from the call, else from the config (as transformers'
    `merge_with_config_defaults`)."""
    return bool(getattr(config, name, False) if value is None else value)


# The same function stands in modeling_occlip/modeling_occlip.py: each model folder must work alone as remote code.
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


# The same function stands in modeling_occlip/modeling_occlip.py: each model folder must work alone as remote code.
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


def _check_caption_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, text) -> None:
    """`input_ids` `[captions, tokens]` of integer ids inside the vocabulary; `attention_mask` of the same shape."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a [captions, tokens] tensor, got {shape}.")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: no caption or no token.")
    if input_ids.shape[1] > text.max_position_embeddings:
        raise ValueError(
            f"input_ids has {input_ids.shape[1]} tokens per caption, more than the text tower's "
            f"max_position_embeddings ({text.max_position_embeddings}); tokenize with truncation=True."
        )
    if input_ids.min() < 0 or input_ids.max() >= text.vocab_size:
        raise ValueError(f"input_ids holds token ids outside the vocabulary [0, {text.vocab_size}).")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(input_ids.shape)} (as input_ids)."
        )


class CLOCModel(CLOCPreTrainedModel):
    """CLOC: a CLIP whose image tokens also give region embeddings through a promptable Prompter.

    `get_image_features` / `get_text_features` behave as in transformers' CLIP; `get_region_features` embeds any
    number of boxes per image from cached image tokens; `ground` predicts a box per region caption.
    """

    main_input_name = "input_ids"
    input_modalities = ("image", "text")

    def __init__(self, config: CLOCConfig):
        super().__init__(config)
        self.text_model = CLIPTextModel._from_config(config.text_config)
        self.vision_model = CLIPVisionModel._from_config(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.region_logit_scale = nn.Parameter(torch.tensor(config.region_logit_scale_init_value))
        self.prompter = CLOCPrompter(
            config.prompter_config,
            config.vision_config.hidden_size,
            config.projection_dim,
            config.vision_config.layer_norm_eps,
        )
        self.box_head = CLOCBoxHead(config)
        self.roi_head = CLOCRoIHead(config) if config.region_head == "roi_align" else None
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; a remote-code folder's `auto_map` also names the zero-shot auto class."""
        if self.is_remote_code():
            # transformers maps one auto class per model class; the zero-shot pipeline (trust_remote_code=True,
            # no package installed) resolves AutoModelForZeroShotImageClassification, so add it here.
            name = f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}"
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModelForZeroShotImageClassification": name,
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_clip(cls, clip, prompter_config: dict | None = None, **config_kwargs) -> "CLOCModel":
        """CLOC whose towers, projections and logit scale are those of a transformers `CLIPModel` (or a folder).

        The Prompter's (and the RoI head's) output LayerNorm and projection start from CLIP's post-LayerNorm and
        visual projection (spec `prompter_init_from_clip`), so a region embedding starts in CLIP's joint space.
        """
        clip = _load_clip(clip, "CLOCModel")
        config = CLOCConfig(**_clip_config_fields(clip), prompter_config=prompter_config, **config_kwargs)
        model = cls(config)
        _load_clip_weights(model, clip, ("prompter.", "box_head.", "roi_head.", "region_logit"))
        with torch.no_grad():
            model.prompter.post_layernorm.load_state_dict(clip.vision_model.post_layernorm.state_dict())
            model.prompter.projection.weight.copy_(clip.visual_projection.weight)
            if model.roi_head is not None:  # the RoI baseline starts as CLIP's own head on pooled patches
                model.roi_head.norm.load_state_dict(clip.vision_model.post_layernorm.state_dict())
                model.roi_head.projection.weight.copy_(clip.visual_projection.weight)
        return model.to(dtype=next(clip.parameters()).dtype)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        """As `CLIPModel.get_image_features`: `pooler_output` is the projected, unnormalised image embedding;
        `last_hidden_state` holds the last layer's tokens (CLS first, before the post-LayerNorm). Hidden states come
        too when the Prompter reads another layer (`prompter_config.vision_feature_layer`)."""
        _check_kwargs(kwargs, "CLOCModel.get_image_features")
        _check_pixel_values(pixel_values, self.config.vision_config, interpolate_pos_encoding)
        if self.config.prompter_config.vision_feature_layer != -1:
            kwargs["output_hidden_states"] = True
        outputs = self.vision_model(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        outputs.pooler_output = self.visual_projection(outputs.pooler_output)
        return outputs

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | BaseModelOutputWithPooling:
        """As `CLIPModel.get_text_features`: `pooler_output` is the projected, unnormalised text embedding."""
        _check_kwargs(kwargs, "CLOCModel.get_text_features")
        outputs = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True, **kwargs
        )
        outputs.pooler_output = self.text_projection(outputs.pooler_output)
        return outputs

    def _prompter_tokens(self, vision_outputs) -> torch.Tensor:
        """The image tokens the Prompter and RoI head read, from `get_image_features`' outputs."""
        return _tokens_of_layer(vision_outputs, self.config.prompter_config.vision_feature_layer)

    def get_image_tokens(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Image tokens `[B, 1+N, D_v]` (CLS first) that region prompts read: cache them for `image_tokens=`."""
        features = self.get_image_features(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True
        )
        return self._prompter_tokens(features)

    def _image_tokens(self, pixel_values, image_tokens, interpolate_pos_encoding: bool) -> torch.Tensor:
        if image_tokens is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or cached image_tokens")
            image_tokens = self.get_image_tokens(pixel_values, interpolate_pos_encoding)
        return image_tokens

    def get_region_features(
        self,
        pixel_values: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        input_boxes: torch.Tensor | None = None,
        box_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
    ) -> CLOCRegionOutput:
        """Region embeddings (`region_embeds` `[B, R, D]`, normalised, zero where masked) of `input_boxes`
        `[B, R, 4]` (normalised xyxy), and the Prompter's region hidden states.

        `image_tokens` (`get_image_tokens(pixel_values)`) can be cached and reused for any prompts.
        `output_attentions` (default `config.output_attentions`) adds the Prompter's `prompter_attentions`.
        """
        if input_boxes is None:
            raise ValueError("get_region_features needs input_boxes [images, regions, 4] (normalised x0, y0, x1, y1)")
        if image_tokens is None and pixel_values is not None:  # named before the towers run
            _check_pixel_values(pixel_values, self.config.vision_config, interpolate_pos_encoding, square_grid=True)
            _check_boxes(input_boxes, box_mask, pixel_values.shape[0], self.config.vision_config.image_size)
        image_tokens = self._image_tokens(pixel_values, image_tokens, interpolate_pos_encoding)
        box_mask = _check_boxes(input_boxes, box_mask, image_tokens.shape[0], self.config.vision_config.image_size)
        hidden, embeds, attentions = self._box_outputs(
            image_tokens, input_boxes, box_mask, _output_flag(self.config, "output_attentions", output_attentions)
        )
        return CLOCRegionOutput(
            region_embeds=embeds, region_hidden_states=hidden, box_mask=box_mask, prompter_attentions=attentions
        )

    def _box_outputs(
        self, image_tokens: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Region hidden states (None for the RoI head), embeddings (zero where masked) and, with
        `output_attentions`, the Prompter's attentions (None for the RoI head) of already validated boxes."""
        if self.roi_head is not None:
            return None, self.roi_head(image_tokens, _fill_masked_boxes(boxes, box_mask)) * box_mask[..., None], None
        return self.prompter.embed_boxes(image_tokens, boxes, box_mask, output_attentions)

    def _region_text_embeds(self, region_input_ids, region_attention_mask, mask) -> torch.Tensor:
        embeds = region_input_ids.new_zeros(
            *mask.shape, self.config.projection_dim, dtype=self.text_projection.weight.dtype
        )
        if mask.any():
            attention = None if region_attention_mask is None else region_attention_mask[mask]
            embeds[mask] = self.get_text_features(region_input_ids[mask], attention, return_dict=True).pooler_output
        return embeds

    def ground(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
    ) -> CLOCGroundingOutput:
        """The box (`predicted_boxes` `[B, R, 4]`, normalised xyxy) of each region caption `input_ids` `[B, R, L]`;
        `output_attentions` (default `config.output_attentions`) adds the Prompter's `prompter_attentions`."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 3:
            raise ValueError("ground needs input_ids of shape [images, captions per image, tokens]")
        if image_tokens is None and pixel_values is not None:  # named before the towers run
            _check_pixel_values(pixel_values, self.config.vision_config, interpolate_pos_encoding, square_grid=True)
            if pixel_values.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"ground needs one row of captions per image: input_ids has {input_ids.shape[0]} rows for "
                    f"{pixel_values.shape[0]} images"
                )
        image_tokens = self._image_tokens(pixel_values, image_tokens, interpolate_pos_encoding)
        if input_ids.shape[0] != image_tokens.shape[0]:
            raise ValueError("ground needs input_ids of shape [images, captions per image, tokens]")
        mask = torch.ones(input_ids.shape[:2], dtype=torch.bool, device=input_ids.device)
        caption_embeds = self._region_text_embeds(input_ids, attention_mask, mask)
        hidden, boxes, attentions = self._ground(
            image_tokens, caption_embeds, _output_flag(self.config, "output_attentions", output_attentions)
        )
        return CLOCGroundingOutput(
            predicted_boxes=boxes,
            region_hidden_states=hidden,
            region_text_embeds=nn.functional.normalize(caption_embeds, dim=-1),
            prompter_attentions=attentions,
        )

    def _ground(
        self, image_tokens: torch.Tensor, caption_embeds: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The Prompter's text-prompt states `[B, R, D_v]`, the box head's boxes `[B, R, 4]` and, with
        `output_attentions`, the Prompter's attentions (`CLOCPrompter.forward_with_attentions`; else None)."""
        prompts = self.prompter.text_prompts(caption_embeds)
        hidden, _, attentions = self.prompter.forward_with_attentions(
            prompts, image_tokens, output_attentions=output_attentions
        )
        return hidden, self.box_head(hidden), attentions

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        input_boxes: torch.Tensor | None = None,
        box_mask: torch.Tensor | None = None,
        region_input_ids: torch.Tensor | None = None,
        region_attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | CLOCOutput:
        """CLIP logits, region embeddings of `input_boxes`, and with `return_loss` the CLOC loss.

        With `region_input_ids` (one caption per box) the region-caption embeddings and grounded boxes are computed
        too; `return_loss` then adds the region and grounding terms (see `loss_from_features`).
        `output_attentions` / `output_hidden_states` reach both towers (`text_model_output`, `vision_model_output`);
        `output_attentions` also gives the Prompter's `region_attentions` and `grounding_attentions`.
        """
        _check_kwargs(kwargs, "CLOCModel.forward")
        output_attentions = _output_flag(self.config, "output_attentions", kwargs.get("output_attentions"))
        self._check_forward_inputs(
            pixel_values, input_ids, attention_mask, input_boxes, box_mask, return_loss, interpolate_pos_encoding
        )
        # Region captions and box masks describe boxes: without input_boxes they would be dropped silently.
        orphans = {"box_mask": box_mask, "region_input_ids": region_input_ids}
        orphans["region_attention_mask"] = region_attention_mask
        orphaned = [name for name, value in orphans.items() if value is not None]
        if input_boxes is None and orphaned:
            raise ValueError(f"CLOCModel.forward got {', '.join(orphaned)} without input_boxes: pass the boxes too.")
        vision = self.get_image_features(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        text = self.get_text_features(input_ids, attention_mask, position_ids, return_dict=True, **kwargs)
        image_tokens = self._prompter_tokens(vision)
        image_embeds = nn.functional.normalize(vision.pooler_output, dim=-1)
        text_embeds = nn.functional.normalize(text.pooler_output, dim=-1)
        logits_per_text = self.clamped_logit_scale() * text_embeds @ image_embeds.t()
        region_embeds = region_text_embeds = predicted_boxes = grounding_mask = region_caption_keys = None
        attention_mass = region_attentions = grounding_attentions = None
        if input_boxes is not None:
            box_mask = _check_boxes(input_boxes, box_mask, image_tokens.shape[0])
            _, region_embeds, region_attentions = self._box_outputs(
                image_tokens, input_boxes, box_mask, output_attentions
            )
            if region_input_ids is not None:
                supervise_attention = self.config.grounding_attention_loss_weight > 0
                region_text_embeds, predicted_boxes, grounding_mask, region_caption_keys, grounding_attentions = (
                    self._region_caption_outputs(
                        image_tokens,
                        box_mask,
                        region_input_ids,
                        region_attention_mask,
                        supervise_attention or output_attentions,
                    )
                )
                if supervise_attention:  # from the grounding pass's own attention, not a second pass
                    image_attention = None
                    if grounding_attentions is not None:
                        image_attention = self.prompter.mean_image_attention(grounding_attentions)
                    attention_mass = self.grounding_attention_mass(
                        image_tokens, region_text_embeds, _fill_masked_boxes(input_boxes, box_mask), image_attention
                    ) * box_mask.to(region_text_embeds.dtype)
                if not output_attentions:
                    grounding_attentions = None
        box_mask = box_mask if input_boxes is not None else None
        losses = (None,) * 5
        if return_loss:
            losses = self.loss_from_features(
                image_embeds,
                text_embeds,
                region_embeds,
                region_text_embeds,
                input_boxes,
                box_mask,
                predicted_boxes,
                grounding_mask,
                region_caption_keys,
                grounding_attention_mass=attention_mass,
            )
        loss, loss_itc, loss_region, loss_grounding, loss_grounding_attention = losses
        # Built once, all fields at once, so the tuple form keeps the declared order (loss first, as CLIP's).
        return CLOCOutput(
            loss=loss,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            loss_itc=loss_itc,
            loss_region=loss_region,
            loss_grounding=loss_grounding,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            region_embeds=region_embeds,
            box_mask=box_mask,
            region_text_embeds=region_text_embeds,
            predicted_boxes=predicted_boxes,
            grounding_mask=grounding_mask,
            region_caption_keys=region_caption_keys,
            grounding_attention_mass=attention_mass,
            loss_grounding_attention=loss_grounding_attention,
            region_attentions=region_attentions,
            grounding_attentions=grounding_attentions,
            text_model_output=text,
            vision_model_output=vision,
        )

    def _check_forward_inputs(
        self, pixel_values, input_ids, attention_mask, input_boxes, box_mask, return_loss, interpolate_pos_encoding
    ):
        """`forward`'s checks, before any tower runs, so a bad input is named instead of failing inside them."""
        if pixel_values is None or input_ids is None:
            raise ValueError("CLOCModel.forward needs pixel_values and input_ids.")
        # Regions place the patch tokens on a square grid; image-text alone takes any grid, as CLIP does.
        square_grid = input_boxes is not None
        _check_pixel_values(pixel_values, self.config.vision_config, interpolate_pos_encoding, square_grid)
        _check_caption_ids(input_ids, attention_mask, self.config.text_config)
        num_images, num_captions = pixel_values.shape[0], input_ids.shape[0]
        if return_loss and num_images != num_captions:
            raise ValueError(
                f"the loss pairs image k with caption k, but got {num_images} images and {num_captions} captions."
            )
        if input_boxes is not None:
            _check_boxes(input_boxes, box_mask, num_images, self.config.vision_config.image_size)

    def clamped_logit_scale(self) -> torch.Tensor:
        """The temperature the logits and the loss use: `exp(logit_scale)` capped at `config.logit_scale_max`."""
        return self.logit_scale.exp().clamp(max=self.config.logit_scale_max)

    def clamped_region_logit_scale(self) -> torch.Tensor:
        """The region-text temperature: `exp(region_logit_scale)` capped at `config.logit_scale_max`."""
        return self.region_logit_scale.exp().clamp(max=self.config.logit_scale_max)

    def region_negative_mask(self, caption_embeds: torch.Tensor, other_embeds: torch.Tensor | None = None):
        """`[V, V']` True where a region-caption pair may stay in the softmax: captions whose cosine with the
        row's own caption is <= `region_text_filter_threshold` (`near_duplicate_mask`; the matching pair is always
        kept by the loss). Without `other_embeds`, the captions are compared with themselves and the diagonal is
        True."""
        other = caption_embeds if other_embeds is None else other_embeds
        keep = near_duplicate_mask(caption_embeds, other, self.config.region_text_filter_threshold)
        if other_embeds is None:
            keep.fill_diagonal_(True)
        return keep

    def grounding_attention_mass(
        self,
        image_tokens: torch.Tensor,
        caption_embeds: torch.Tensor,
        boxes: torch.Tensor,
        image_attention: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`[B, R]`: the share of each caption's text-prompt attention over the image patches (CLS and the prompt
        itself left out) that falls inside `boxes`, weighting each patch by its covered area. `image_attention`
        (`[B, R, 1+N]`, `CLOCPrompter.mean_image_attention` of the grounding pass's attentions) saves computing it
        again."""
        if image_attention is None:
            prompts = self.prompter.text_prompts(caption_embeds)
            image_attention = self.prompter.attention_over_image(prompts, image_tokens)
        patches = image_attention[..., 1:]
        patches = patches / patches.sum(-1, keepdim=True).clamp(min=torch.finfo(patches.dtype).tiny)
        return (patches * box_patch_overlap(boxes.to(patches.dtype), patches.shape[-1])).sum(-1)

    def _region_caption_outputs(
        self, image_tokens, box_mask, region_input_ids, region_attention_mask, output_attentions: bool = False
    ):
        """Normalised caption embeddings `[B, R, D]`, grounded boxes `[B, R, 4]`, the grounding target mask, the
        caption keys (`[B, R]`, -1 where masked) and, with `output_attentions`, the Prompter's attentions of the
        text prompts (`CLOCPrompter.forward_with_attentions`; else None)."""
        if tuple(region_input_ids.shape[:2]) != tuple(box_mask.shape):
            raise ValueError(
                f"region_input_ids has shape {tuple(region_input_ids.shape)}, expected one caption per box: "
                f"{tuple(box_mask.shape)} + (tokens,)"
            )
        caption_embeds = self._region_text_embeds(region_input_ids, region_attention_mask, box_mask)
        _, predicted, attention = self._ground(image_tokens, caption_embeds, output_attentions)
        keys = caption_keys(region_input_ids, region_attention_mask).masked_fill(~box_mask, -1)
        # Grounding: a caption repeated within its image has no single target box.
        target = box_mask.clone()
        if self.config.grounding_unique_only:
            same = (keys[:, :, None] == keys[:, None, :]) & box_mask[:, :, None] & box_mask[:, None, :]
            target &= same.sum(-1) == 1
        embeds = nn.functional.normalize(caption_embeds, dim=-1) * box_mask[..., None]
        return embeds, predicted, target, keys, attention

    def loss_from_features(
        self,
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
        """`(loss, loss_itc, loss_region, loss_grounding, loss_grounding_attention)` of one process's batch, from
        `forward`'s outputs: `cloc_loss` (see there for the terms). Training over several processes uses
        `training.losses.CLOCLoss`, which calls `cloc_loss` on the gathered features."""
        regions = None
        if region_embeds is not None and region_text_embeds is not None:
            regions = {
                "region_embeds": region_embeds[box_mask],
                "region_text_embeds": region_text_embeds[box_mask],
                "region_caption_keys": None if region_caption_keys is None else region_caption_keys[box_mask],
                "box_mask": box_mask,
                "input_boxes": input_boxes,
                "predicted_boxes": predicted_boxes,
                "grounding_mask": grounding_mask,
                "grounding_attention_mass": grounding_attention_mass,
            }
        return cloc_loss(
            self.config,
            self.clamped_logit_scale(),
            self.clamped_region_logit_scale(),
            image_embeds,
            text_embeds,
            regions=regions,
        )


@dataclass
class CLOCVisionOutput(BaseModelOutputWithPooling):
    r"""Output of [`CLOCVisionModel.forward`]: CLIP's vision output, plus region outputs when `input_boxes` are given.

    last_hidden_state (`torch.Tensor` of shape `(batch_size, 1 + patches, hidden_size)`):
        The last layer's tokens, CLS first, before the post-LayerNorm (as `CLIPVisionModel`).
    pooler_output (`torch.Tensor` of shape `(batch_size, hidden_size)`):
        The post-LayerNormed CLS token (unprojected, as `CLIPVisionModel`).
    hidden_states (`tuple(torch.Tensor)`, *optional*, returned with `output_hidden_states=True`):
        The embeddings and every layer's output, each `(batch_size, 1 + patches, hidden_size)`.
    attentions (`tuple(torch.Tensor)`, *optional*, returned with `output_attentions=True`):
        Every layer's attention weights, each `(batch_size, heads, 1 + patches, 1 + patches)`.
    region_hidden_states (`torch.Tensor` of shape `(batch_size, regions, hidden_size)`, *optional*, returned with
        `input_boxes`):
        The Prompter's pooled prompt states at ViT width (what a Ferret-style MLLM projects into region tokens); zero
        where `box_mask` is False.
    region_embeds (`torch.Tensor` of shape `(batch_size, regions, projection_dim)`, *optional*, returned with
        `input_boxes`):
        Normalised region embeddings in CLOC's joint space (equal to `CLOCModel.get_region_features`); zero where
        `box_mask` is False.
    region_attentions (`tuple(torch.Tensor)`, *optional*, returned with `input_boxes` and `output_attentions=True`):
        The Prompter's attentions, one per layer, `(batch_size, regions, heads, 2, 2 + 1 + patches)`, as
        `CLOCModel.get_region_features(output_attentions=True).prompter_attentions`.
    """

    region_hidden_states: torch.Tensor | None = None
    region_embeds: torch.Tensor | None = None
    region_attentions: tuple[torch.Tensor, ...] | None = None


class CLOCVisionModel(CLIPVisionModel):
    """CLOC's image tower alone: a CLIP ViT usable as a vision backbone (LLaVA builds it from `CLOCVisionConfig`).

    `CLOCVisionModel.from_pretrained(cloc_folder)` takes the tower and the Prompter out of a full CLOC checkpoint;
    the forward is CLIP's (`output_hidden_states` gives `num_hidden_layers + 1` states, CLS at position 0), and
    `input_boxes=` (normalised xyxy `[B, R, 4]`) adds region outputs when the config has a `prompter_config`.
    """

    config: CLOCVisionConfig

    def __init__(self, config: CLOCVisionConfig):
        # CLIPVisionModel's body, with the Prompter built before `post_init` so that it is initialised there too.
        CLIPPreTrainedModel.__init__(self, config)
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        prompter_config = config.build_prompter_config()
        self.prompter = None
        if prompter_config is not None:
            self.prompter = CLOCPrompter(
                prompter_config, config.hidden_size, config.projection_dim, config.layer_norm_eps
            )
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; from a full CLOC folder the tower also takes the Prompter (the folder's
        `prompter_config` and `projection_dim` join its vision config), so `forward(..., input_boxes=...)` works."""
        if kwargs.get("config") is None and pretrained_model_name_or_path is not None:
            hub = _hub_kwargs(kwargs)
            try:
                full = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub)[0]
            except (OSError, TypeError, ValueError):  # no config file: left to transformers to report
                full = {}
            if full.get("model_type") == "cloc":
                vision = CLOCVisionConfig.from_pretrained(pretrained_model_name_or_path, **hub)
                kwargs["config"] = vision.with_prompter(full.get("prompter_config"), full.get("projection_dim", 512))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        """CLIP's initialisation for the tower; the Prompter's rule (`_init_prompter`) from `prompter_config`."""
        super()._init_weights(module)
        if isinstance(module, CLOCPrompter):
            _init_prompter(module, self.config.build_prompter_config().initializer_std(self.config.hidden_size))

    def initialize_weights(self):
        """Every module through `_init_weights`, as transformers does for its own models (see
        `_initialize_every_module`)."""
        _initialize_every_module(self)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_boxes: torch.Tensor | None = None,
        box_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple | CLOCVisionOutput:
        """CLIP's vision forward; with `input_boxes` (normalised xyxy `[B, R, 4]`) also `region_hidden_states`
        `[B, R, D_v]`, `region_embeds` `[B, R, D]` and, with `output_attentions`, `region_attentions`, as
        `CLOCModel.get_region_features` gives them."""
        _check_kwargs(kwargs, "CLOCVisionModel.forward")
        _check_pixel_values(pixel_values, self.config, interpolate_pos_encoding, square_grid=input_boxes is not None)
        layer = None
        if input_boxes is not None:
            if self.prompter is None:
                raise ValueError(
                    "input_boxes were given but this CLOCVisionModel has no Prompter: load it from a full CLOC "
                    "checkpoint (CLOCVisionModel.from_pretrained(cloc_folder)) or set CLOCVisionConfig.prompter_config."
                )
            box_mask = _check_boxes(input_boxes, box_mask, pixel_values.shape[0], self.config.image_size)
            layer = self.config.build_prompter_config().vision_feature_layer
            if layer != -1:
                kwargs["output_hidden_states"] = True  # the Prompter reads an earlier layer
        outputs = super().forward(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **kwargs
        )
        result = CLOCVisionOutput(**outputs)
        if input_boxes is not None:
            output_attentions = _output_flag(self.config, "output_attentions", kwargs.get("output_attentions"))
            hidden, embeds, attentions = self.prompter.embed_boxes(
                _tokens_of_layer(outputs, layer), input_boxes, box_mask, output_attentions
            )
            result = CLOCVisionOutput(
                **outputs, region_hidden_states=hidden, region_embeds=embeds, region_attentions=attentions
            )
        return result

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

    def save_prompter(self, folder) -> None:
        """Write the Prompter side-car: `prompter_config.json` (what `attach_prompter` needs besides the CLIP
        tower) and `prompter.safetensors` (the Prompter and box-head weights, `prompter.*` keys)."""
        if self.prompter is None:
            raise ValueError("this CLOCVisionModel has no Prompter to save: load it from a full CLOC folder")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sidecar = {
            "prompter_config": self.config.prompter_config,
            "projection_dim": self.config.projection_dim,
            "hidden_size": self.config.hidden_size,
        }
        (folder / PROMPTER_CONFIG_NAME).write_text(json.dumps(sidecar, indent=2) + "\n")
        weights = {k: v.contiguous() for k, v in self.state_dict().items() if k.startswith("prompter.")}
        save_file(weights, str(folder / PROMPTER_WEIGHTS_NAME))

    @classmethod
    def attach_prompter(cls, vision_model: CLIPVisionModel, folder) -> "CLOCVisionModel":
        """A `CLOCVisionModel` made of a stock `vision_model` (e.g. a reloaded LLaVA's `vision_tower`) plus the
        side-car Prompter `save_prompter` wrote to `folder`; `forward(..., input_boxes=...)` then gives region outputs."""
        folder = Path(folder)
        if not (folder / PROMPTER_CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{folder} holds no {PROMPTER_CONFIG_NAME}: not a Prompter side-car folder")
        sidecar = json.loads((folder / PROMPTER_CONFIG_NAME).read_text())
        fields = {
            k: v
            for k, v in vision_model.config.to_dict().items()
            if k not in ("model_type", "architectures", "auto_map", "transformers_version")
        }
        if fields["hidden_size"] != sidecar["hidden_size"]:
            raise ValueError(
                f"the side-car Prompter is {sidecar['hidden_size']} wide but the vision model's hidden_size is "
                f"{fields['hidden_size']}: they come from different towers"
            )
        fields.update(prompter_config=sidecar["prompter_config"], projection_dim=sidecar["projection_dim"])
        tower = cls(CLOCVisionConfig(**fields))
        weights = {**vision_model.state_dict(), **load_file(str(folder / PROMPTER_WEIGHTS_NAME))}
        tower.load_state_dict(weights, strict=True)
        return tower.to(vision_model.dtype).train(vision_model.training)


PROMPTER_CONFIG_NAME = "prompter_config.json"
PROMPTER_WEIGHTS_NAME = "prompter.safetensors"


# Saved and loaded under CLIP's `vision_model.` prefix, as transformers does for CLIPVisionModel: the tower reads
# full CLOC checkpoints and writes files CLIP-era readers understand.
register_checkpoint_conversion_mapping(
    "CLOCVisionModel", [PrefixChange(prefix_to_remove="vision_model")], overwrite=True
)


__all__ = [
    "CLOCGroundingOutput",
    "CLOCRegionOutput",
    "CLOCVisionModel",
    "CLOCVisionOutput",
    "CLOCModel",
    "CLOCOutput",
    "CLOCPreTrainedModel",
    "CLOCPrompter",
    "box_position_encoding",
    "roi_align_mean",
]
