"""The one rule for pixel boxes on the processing side: `[x0, y0, x1, y1]`, four finite numbers, x1 > x0, y1 > y0.

`CLOCProcessor` (boxes it normalises), the training collator and dataset reader (a row's `regions`) and VESL (boxes
it writes) all go through `box_problem`, so a box one of them accepts is accepted by the others and the error
says the same thing everywhere. The models check their normalised boxes themselves: a model folder must stay
self-contained for remote code.
"""

import math
import numbers

__all__ = ["box_problem", "check_box"]


def _shown(box) -> str:
    text = repr(box.tolist() if hasattr(box, "tolist") else box)
    return text if len(text) <= 80 else text[:77] + "..."


def _number(value):
    """A plain number for ints, floats, numpy scalars and 0-d tensors / arrays; `None` for anything else."""
    if hasattr(value, "ndim") and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return value


def box_problem(box, name: str = "box", values: bool = True) -> str | None:
    """What makes `box` not an `[x0, y0, x1, y1]` pixel box, as a phrase that starts with `name`, or `None`.

    With `values=False` only the format is checked (4 numbers; what a schema can hold), not that the numbers are
    finite and ordered. Lists, tuples, numpy arrays and tensors of shape `[4]` are accepted; bools are not numbers.
    """
    items = box.tolist() if hasattr(box, "tolist") and getattr(box, "ndim", 1) == 1 else box
    coordinates = [_number(v) for v in items] if isinstance(items, (list, tuple)) else None
    if coordinates is None or len(coordinates) != 4 or any(v is None for v in coordinates):
        return f"{name} {_shown(box)} is not 4 numbers [x0, y0, x1, y1]"
    if not values:
        return None
    x0, y0, x1, y1 = (float(v) for v in coordinates)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return f"{name} {_shown(box)} holds NaN or infinity"
    if x1 <= x0 or y1 <= y0:
        return f"{name} {_shown(box)} needs x1 > x0 and y1 > y0"
    return None


def check_box(box, where: str, name: str = "box") -> list[float]:
    """`box` as 4 floats, or a `ValueError` `"{where}: {name} ... <problem>"` (see `box_problem`)."""
    problem = box_problem(box, name)
    if problem is not None:
        raise ValueError(f"{where}: {problem}")
    items = box.tolist() if hasattr(box, "tolist") and getattr(box, "ndim", 1) == 1 else box
    return [float(_number(v)) for v in items]
