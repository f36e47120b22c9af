"""Diagnostics for whether OC-CLIP's binding module and CLOC's Prompter localise, and what their features carry.

Pure torch (no sklearn): attention mass inside / outside object boxes on a ViT patch grid, closed-form ridge
linear probes, and the chance level of OC-CLIP's relation loss.

Boxes are normalised `xyxy` in `[0, 1]`. The patch grid is `grid x grid`, row-major: patch `k = i * grid + j`
(row `i`, column `j`) has centre `((j + 0.5) / grid, (i + 0.5) / grid)`.
"""

import math
import statistics

import torch


def patch_box_mask(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """Which patches of a `grid x grid` patch grid have their centre inside each box.

    `boxes` is `[..., 4]` normalised xyxy; a centre `(cx, cy)` is inside when `x0 <= cx < x1` and
    `y0 <= cy < y1`. Returns bool `[..., grid * grid]` (row-major patches).

    Fallback: a box that contains no patch centre (smaller than a patch, or thin) is given the single patch that
    contains the box's own centre (clamped to the grid), so every box covers at least one patch.
    """
    boxes = torch.as_tensor(boxes)
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [..., 4] xyxy, got shape {tuple(boxes.shape)}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    boxes = boxes.to(torch.float64)
    centres = (torch.arange(grid, dtype=torch.float64, device=boxes.device) + 0.5) / grid
    x0, y0, x1, y1 = boxes.unbind(-1)
    inside_x = (x0[..., None] <= centres) & (centres < x1[..., None])  # [..., grid] over columns j
    inside_y = (y0[..., None] <= centres) & (centres < y1[..., None])  # [..., grid] over rows i
    mask = (inside_y[..., :, None] & inside_x[..., None, :]).flatten(-2)  # [..., grid * grid], k = i * grid + j

    # Fallback: the patch containing the box centre, for boxes that cover no patch centre.
    col = torch.floor((x0 + x1) / 2 * grid).clamp(0, grid - 1).long()
    row = torch.floor((y0 + y1) / 2 * grid).clamp(0, grid - 1).long()
    fallback = torch.nn.functional.one_hot(row * grid + col, grid * grid).bool()
    empty = ~mask.any(-1, keepdim=True)
    return torch.where(empty, fallback, mask)


def _row_normalise(attention: torch.Tensor) -> torch.Tensor:
    """Each row divided by its sum over the last axis (rows summing to zero stay zero)."""
    total = attention.sum(-1, keepdim=True)
    return attention / total.clamp_min(torch.finfo(attention.dtype).tiny)


def _masked_mean(values: torch.Tensor, valid: torch.Tensor) -> float:
    """Mean of `values` over `valid` entries as a Python float (`nan` when none are valid)."""
    count = valid.sum()
    if count == 0:
        return float("nan")
    return float((values * valid).sum() / count)


def binding_box_mass(attention: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor, grid: int) -> dict:
    """Share of each binding node's patch attention that falls inside its own object's box vs. the others'.

    `attention` is `[B, M, N]` (node `m`'s attention over `N = grid * grid` patches, e.g. the last binding layer
    averaged over heads); each row is first normalised by its sum over patches. `boxes` is `[B, M, 4]` (node
    `m`'s own object box, normalised xyxy), `box_mask` `[B, M]` marks valid nodes.

    Returns Python floats, each a mean over valid nodes:
    `own_box` (mass on patches in the node's own box), `other_boxes` (mass on patches in the union of the other
    valid nodes' boxes of the same image, excluding patches also in the own box, which count for `own_box`
    only) and `own_area` (fraction of patches in the own box: the `own_box` a uniform map would get).
    Boxes go through `patch_box_mask`, so every box covers at least one patch. `nan` if no node is valid.
    """
    attention = torch.as_tensor(attention).to(torch.float64)
    if attention.dim() != 3 or attention.shape[-1] != grid * grid:
        raise ValueError(f"attention must be [B, M, {grid * grid}], got shape {tuple(attention.shape)}")
    valid = torch.as_tensor(box_mask, device=attention.device).bool()
    own = patch_box_mask(torch.as_tensor(boxes, device=attention.device), grid)  # [B, M, N]
    own = own & valid[..., None]
    # Per image, how many valid boxes cover each patch; removing the node's own box leaves the others' union.
    cover = own.sum(1, keepdim=True)  # [B, 1, N]
    other = ((cover - own.long()) > 0) & ~own

    attention = _row_normalise(attention)
    own_mass = (attention * own).sum(-1)
    other_mass = (attention * other).sum(-1)
    own_area = own.double().mean(-1)
    return {
        "own_box": _masked_mean(own_mass, valid),
        "other_boxes": _masked_mean(other_mass, valid),
        "own_area": _masked_mean(own_area, valid),
    }


def prompter_box_mass(attention: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor, grid: int) -> dict:
    """How CLOC's Prompter splits its attention between the CLS token and the patches of the prompted box.

    `attention` is `[B, R, 1 + N]` over `[CLS, patch_1 .. patch_N]` (already averaged over heads and prompt
    tokens; each row is normalised by its total first), `boxes` `[B, R, 4]` normalised xyxy, `box_mask`
    `[B, R]` valid regions.

    Returns Python floats, each a mean over valid regions: `cls` (share on CLS), `inside_box` (share inside the
    box among patches only, i.e. renormalised over the `N` patches) and `box_area` (fraction of patches inside
    the box: the `inside_box` of a uniform map). Boxes go through `patch_box_mask` (at least one patch each).
    `nan` if no region is valid.
    """
    attention = torch.as_tensor(attention).to(torch.float64)
    if attention.dim() != 3 or attention.shape[-1] != 1 + grid * grid:
        raise ValueError(f"attention must be [B, R, 1 + {grid * grid}], got shape {tuple(attention.shape)}")
    valid = torch.as_tensor(box_mask, device=attention.device).bool()
    inside = patch_box_mask(torch.as_tensor(boxes, device=attention.device), grid)  # [B, R, N]

    cls = _row_normalise(attention)[..., 0]
    patches = _row_normalise(attention[..., 1:])
    inside_mass = (patches * inside).sum(-1)
    box_area = inside.double().mean(-1)
    return {
        "cls": _masked_mean(cls, valid),
        "inside_box": _masked_mean(inside_mass, valid),
        "box_area": _masked_mean(box_area, valid),
    }


def _ridge_fit_predict(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Closed-form ridge with an unpenalised intercept on features standardised with train statistics (float64).

    Returns predictions for `test_x`, `[n_test, k]`. Constant train features (zero std) are centred only.
    """
    train_x = torch.as_tensor(train_x).to(torch.float64).reshape(len(train_x), -1)
    test_x = torch.as_tensor(test_x).to(device=train_x.device, dtype=torch.float64).reshape(len(test_x), -1)
    train_y = torch.as_tensor(train_y).to(device=train_x.device, dtype=torch.float64)
    if train_x.shape[0] != train_y.shape[0]:
        raise ValueError(f"train_x has {train_x.shape[0]} rows but train_y has {train_y.shape[0]}")
    mean = train_x.mean(0)
    std = train_x.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    xs = (train_x - mean) / std
    xt = (test_x - mean) / std
    y_mean = train_y.mean(0)
    gram = xs.T @ xs + alpha * torch.eye(xs.shape[1], dtype=torch.float64, device=xs.device)
    weights = torch.linalg.solve(gram, xs.T @ (train_y - y_mean))
    return xt @ weights + y_mean


def ridge_regression_r2(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    alpha: float = 1.0,
) -> float:
    """Held-out R² of a linear (ridge) probe from features `[n, d]` to targets `[n]` or `[n, k]`.

    Closed-form ridge (penalty `alpha`, unpenalised intercept) on features standardised with the train mean/std,
    in float64. R² per target dim is `1 - SSE / SST` with SST around the *test* mean, averaged over dims; dims
    with zero test variance are skipped (`nan` if all are). 1 means the target is linearly decodable, ~0 (or
    below) means no better than predicting the mean.
    """
    test_y = torch.as_tensor(test_y).to(torch.float64)
    pred = _ridge_fit_predict(train_x, train_y, test_x, alpha)
    test_y = test_y.to(pred.device).reshape(pred.shape)
    if pred.dim() == 1:
        pred, test_y = pred[:, None], test_y[:, None]
    sse = ((test_y - pred) ** 2).sum(0)
    sst = ((test_y - test_y.mean(0)) ** 2).sum(0)
    keep = sst > 0
    if not keep.any():
        return float("nan")
    return float((1 - sse[keep] / sst[keep]).mean())


def ridge_classification_accuracy(
    train_x: torch.Tensor,
    train_labels: torch.Tensor,
    test_x: torch.Tensor,
    test_labels: torch.Tensor,
    alpha: float = 1.0,
) -> float:
    """Held-out accuracy of a linear (ridge) classifier: ridge onto one-hot targets, predict the argmax.

    Same fit as `ridge_regression_r2` (standardised features, intercept, float64). The classes are those seen in
    `train_labels` (integer ids); a test label never seen in training is always counted wrong.
    """
    train_labels = torch.as_tensor(train_labels).long().reshape(-1)
    test_labels = torch.as_tensor(test_labels).long().reshape(-1)
    classes = torch.unique(train_labels)
    one_hot = (train_labels[:, None] == classes[None, :]).to(torch.float64)
    scores = _ridge_fit_predict(train_x, one_hot, test_x, alpha)
    predicted = classes.to(scores.device)[scores.argmax(-1)]
    return float((predicted == test_labels.to(scores.device)).double().mean())


def chance_relation_loss(num_negatives: int) -> float:
    """Chance level of OC-CLIP's relation loss with `K = num_negatives` negatives: `ln(K + 1)`.

    The loss is a cross-entropy over the scores of the true scene graph and its `K` perturbed negatives. A model
    that cannot tell them apart gives all `K + 1` candidates equal scores, i.e. a uniform softmax assigning
    `1 / (K + 1)` to the true graph, whose negative log is `ln(K + 1)`. A loss at this level means no relational
    signal has been learned.
    """
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    return math.log(num_negatives + 1)


# ------------------------------------------------------------------------------------- model-level diagnostics


def _object_labels(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per object of every row (regions in order): colour index, shape index and normalised box `[n, 4]`.

    Region texts are `"[size] colour shape"` (the synthetic generator's); images are square (`width` = side)."""
    from .synthetic import COLOURS, SHAPES

    colours, shapes, boxes = [], [], []
    for row in rows:
        side = float(row["image"].width)
        for region in row["regions"]:
            *_, colour, shape = region["text"].split()
            colours.append(list(COLOURS).index(colour))
            shapes.append(SHAPES.index(shape))
            boxes.append([v / side for v in region["bbox"]])
    return torch.tensor(colours), torch.tensor(shapes), torch.tensor(boxes, dtype=torch.float64)


def _probe(train: tuple, test: tuple) -> dict:
    """Colour / shape accuracy and centre R² of ridge probes from features to their object (train -> test)."""
    (x_tr, colour_tr, shape_tr, centre_tr), (x_te, colour_te, shape_te, centre_te) = train, test
    return {
        "colour_accuracy": ridge_classification_accuracy(x_tr, colour_tr, x_te, colour_te),
        "shape_accuracy": ridge_classification_accuracy(x_tr, shape_tr, x_te, shape_te),
        "centre_r2": ridge_regression_r2(x_tr, centre_tr, x_te, centre_te),
    }


def _centres(boxes: torch.Tensor) -> torch.Tensor:
    return torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], dim=-1)


def _patch_probe_data(tokens: torch.Tensor, rows: list[dict]) -> tuple:
    """Patch tokens `[B, N, D]` whose centre lies in an object's box, with that object's labels and the patch's
    own centre (a token keeps its position when the centre is linearly readable)."""
    colours, shapes, boxes = _object_labels(rows)
    grid = int(round(tokens.shape[1] ** 0.5))
    image_of = torch.tensor([b for b, row in enumerate(rows) for _ in row["regions"]])
    inside = patch_box_mask(boxes, grid)  # [objects, N]
    features, colour, shape, centre = [], [], [], []
    axis = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    patch_centres = torch.stack(torch.meshgrid(axis, axis, indexing="ij")[::-1], -1).reshape(-1, 2)
    for k in range(len(boxes)):
        patches = inside[k].nonzero().flatten()
        features.append(tokens[image_of[k], patches])
        colour += [int(colours[k])] * len(patches)
        shape += [int(shapes[k])] * len(patches)
        centre.append(patch_centres[patches])
    return torch.cat(features), torch.tensor(colour), torch.tensor(shape), torch.cat(centre)


@torch.no_grad()
def occlip_diagnostics(model, processor, train_rows: list[dict], test_rows: list[dict]) -> dict:
    """What OC-CLIP's binding does on synthetic rows (`image` opened, gold `scene_graph`, `regions` in node order):
    last-layer binding-attention mass on each node's own box vs the other objects' boxes, the chance value of
    `L_rel` for these graphs, and ridge probes (fit on `train_rows`, scored on `test_rows`) of the patch tokens
    feeding the binding and of the slots: colour, shape and centre of their object."""
    from modeling_occlip import OCCLIPImageFeatures  # here: CLOC's and CLIP's diagnostics load no OC-CLIP code

    model.eval()
    layer = model.config.binding_config.vision_feature_layer

    def encode(rows):
        inputs = processor(images=[r["image"] for r in rows], scene_graphs=[r["scene_graph"] for r in rows])
        pixels = inputs.pop("pixel_values")
        hidden = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
        keys, values = model.binding.encode_image(hidden)  # what get_image_features builds, from the same pass
        text = model.get_graph_features(**inputs)
        image = OCCLIPImageFeatures(binding_keys=keys, binding_values=values)
        slots, attentions = model.bind_pairs(image, text, output_attentions=True)
        return hidden, slots, attentions[-1], text

    hidden_tr, slots_tr, _, _ = encode(train_rows)
    hidden_te, slots_te, attention_te, text_te = encode(test_rows)
    colours, shapes, boxes = _object_labels(test_rows)
    num_nodes = attention_te.shape[-2] - model.config.binding_config.num_default_queries
    node_boxes = torch.zeros(len(test_rows), num_nodes, 4, dtype=torch.float64)
    node_valid = torch.zeros(len(test_rows), num_nodes, dtype=torch.bool)
    start = 0
    for b, row in enumerate(test_rows):
        count = len(row["regions"])
        node_boxes[b, :count], node_valid[b, :count] = boxes[start : start + count], True
        start += count
    grid = int(round(attention_te.shape[-1] ** 0.5))
    mass = binding_box_mass(attention_te.mean(1)[:, :num_nodes], node_boxes, node_valid, grid)
    _, _, valid = model.relation_negatives(text_te)
    has_relation = text_te.relation_mask.any(-1)
    counts = valid.sum(-1)[has_relation & (valid.sum(-1) > 0)]
    chance = statistics.fmean(chance_relation_loss(int(k)) for k in counts) if len(counts) else float("nan")

    def slot_data(slots, rows):
        c, s, b = _object_labels(rows)
        x = torch.cat([slots[i, : len(row["regions"])] for i, row in enumerate(rows)])
        return x, c, s, _centres(b)

    return {
        "binding_mass_own_box": mass["own_box"],
        "binding_mass_other_boxes": mass["other_boxes"],
        "own_box_area": mass["own_area"],
        "relation_loss_chance": chance,
        "probe_patch_tokens": _probe(
            _patch_probe_data(hidden_tr, train_rows), _patch_probe_data(hidden_te, test_rows)
        ),
        "probe_slots": _probe(slot_data(slots_tr, train_rows), slot_data(slots_te, test_rows)),
    }


@torch.no_grad()
def cloc_diagnostics(model, processor, train_rows: list[dict], test_rows: list[dict]) -> dict:
    """What CLOC's Prompter reads and writes on synthetic rows (`image` opened, `regions`): attention mass on CLS
    and, among patches, inside the prompted box vs its area share; ridge probes (fit on `train_rows`, scored on
    `test_rows`) of the image tokens it reads and of its region embeddings: colour, shape and centre."""
    model.eval()

    def encode(rows):
        inputs = processor(
            images=[r["image"] for r in rows], input_boxes=[[g["bbox"] for g in r["regions"]] for r in rows]
        )
        tokens = model.get_image_tokens(inputs["pixel_values"])
        boxes, box_mask = inputs["input_boxes"], inputs["box_mask"]
        embeds = model.get_region_features(image_tokens=tokens, input_boxes=boxes, box_mask=box_mask).region_embeds
        return tokens, embeds[box_mask], boxes, box_mask

    tokens_tr, regions_tr, _, _ = encode(train_rows)
    tokens_te, regions_te, boxes_te, mask_te = encode(test_rows)
    results = {}
    if model.prompter is not None and model.roi_head is None and len(model.prompter.layers) == 1:
        prompter = model.prompter
        attention = prompter.image_attention(prompter.box_prompts(boxes_te), tokens_te, boxes_te)
        grid = int(round((tokens_te.shape[1] - 1) ** 0.5))
        mass = prompter_box_mass(attention, boxes_te.double(), mask_te, grid)
        results.update(
            prompter_mass_cls=mass["cls"], prompter_mass_in_box=mass["inside_box"], box_area=mass["box_area"]
        )

    def region_data(embeds, rows):
        c, s, b = _object_labels(rows)
        return embeds, c, s, _centres(b)

    results["probe_image_tokens"] = _probe(
        _patch_probe_data(tokens_tr[:, 1:], train_rows), _patch_probe_data(tokens_te[:, 1:], test_rows)
    )
    results["probe_region_embeds"] = _probe(region_data(regions_tr, train_rows), region_data(regions_te, test_rows))
    return results
