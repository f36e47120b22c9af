"""A literal, one-pair-at-a-time OC-CLIP score written from the spec's pseudo-code (`docs/occlip.md` §2.1-2.2).

It uses the model's parameters but none of its batching, folding, caching or padding logic, so agreement with
`OCCLIPModel.score` checks all of those.
"""

import torch
from torch.nn import functional as F


def _phrase_embedding(model, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    length = int(attention.sum())
    pooled = model.text_model(input_ids=ids[None, :length], attention_mask=attention[None, :length]).pooler_output
    if model.config.text_embedding_source == "projected":
        pooled = model.text_projection(pooled)
    return pooled[0]


@torch.no_grad()
def reference_logit(model, pixel_values: torch.Tensor, graph: dict, b: int) -> torch.Tensor:
    """Structured logit of one image `[3, H, W]` and caption `b` of the padded `graph` inputs."""
    cfg = model.config.binding_config
    layer = cfg.vision_feature_layer
    out = model.vision_model(pixel_values=pixel_values[None], output_hidden_states=True)
    patches = out.hidden_states[layer][0, 1:]
    binding = model.binding
    x = binding.input_norm(binding.input_proj(patches))
    if cfg.position_frequencies >= 0:  # patch centre (x, y) in [-1, 1], then sin and cos of pi*k*x / pi*k*y
        side = int(len(patches) ** 0.5)
        rows = []
        for k in range(len(patches)):
            cx, cy = ((k % side) + 0.5) / side * 2 - 1, ((k // side) + 0.5) / side * 2 - 1
            freqs = range(1, cfg.position_frequencies + 1)
            sines = [torch.sin(torch.tensor(torch.pi * f * c)) for c in (cx, cy) for f in freqs]
            cosines = [torch.cos(torch.tensor(torch.pi * f * c)) for c in (cx, cy) for f in freqs]
            rows.append(torch.tensor([cx, cy, *sines, *cosines]))
        x = x + binding.position_proj(torch.stack(rows).to(x.dtype))

    nodes = [m for m in range(graph["node_mask"].shape[1]) if graph["node_mask"][b, m]]
    relations = [p for p in range(graph["relation_mask"].shape[1]) if graph["relation_mask"][b, p]]
    node_pos = {m: i for i, m in enumerate(nodes)}
    E = torch.stack(
        [_phrase_embedding(model, graph["node_input_ids"][b, m], graph["node_attention_mask"][b, m]) for m in nodes]
    )
    R = [
        _phrase_embedding(model, graph["relation_input_ids"][b, p], graph["relation_attention_mask"][b, p])
        for p in relations
    ]

    q0 = torch.cat([binding.node_proj(E), binding.default_queries], dim=0)
    slots = torch.zeros_like(q0)
    for lyr in binding.layers:
        heads, dh = lyr.num_heads, lyr.head_dim
        q = lyr.q_proj(lyr.query_norm(q0 + slots)).view(-1, heads, dh)
        k = lyr.k_proj(x).view(-1, heads, dh)
        v = lyr.v_proj(x).view(-1, heads, dh)
        per_head = []
        for h in range(heads):
            logits = q[:, h] @ k[:, h].T / dh**0.5  # [Q, N]
            a = logits.softmax(dim=0)  # competition between queries for each patch
            w = a / (a.sum(dim=1, keepdim=True) + cfg.eps) if cfg.renormalize else a
            per_head.append(w @ v[:, h])
        slots = slots + lyr.out_proj(torch.cat(per_head, dim=-1))
        slots = slots + lyr.mlp(lyr.mlp_norm(slots))
    S = slots[: len(nodes)]

    sim = model.similarity
    o = F.cosine_similarity(sim.node_proj(E), sim.slot_proj(S), dim=-1)
    r = []
    for j, p in enumerate(relations):
        s_idx = node_pos[int(graph["relation_subject_index"][b, p])]
        o_idx = node_pos[int(graph["relation_object_index"][b, p])]
        fs = sim.subject_mlp.fc2(sim.subject_mlp.activation_fn(sim.subject_mlp.fc1(torch.cat([R[j], S[s_idx]]))))
        fo = sim.object_mlp.fc2(sim.object_mlp.activation_fn(sim.object_mlp.fc1(torch.cat([R[j], S[o_idx]]))))
        r.append(F.cosine_similarity(sim.relation_proj(R[j]), fs + fo, dim=0))
    alpha, beta = sim.log_alpha.exp(), sim.log_beta.exp()
    total = alpha * o.sum() + beta * (torch.stack(r).sum() if r else 0.0)
    s = total / (alpha * len(nodes) + beta * len(relations))
    return s * model.logit_scale.exp().clamp(max=model.config.logit_scale_max)
