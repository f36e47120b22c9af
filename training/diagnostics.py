"""Diagnostics for whether OC-CLIP's binding module and CLOC's Prompter localise, and what their features carry.

Pure torch (no sklearn): attention mass inside / outside object boxes on a ViT patch grid, closed-form ridge
linear probes, and the chance level of OC-CLIP's relation loss.

Boxes are normalised `xyxy` in `[0, 1]`. The patch grid is `grid x grid`, row-major: patch `k = i * grid + j`
(row `i`, column `j`) has centre `((j + 0.5) / grid, (i + 0.5) / grid)`.
"""

import math

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
