"""Procedural scenes for the offline binding and localisation benchmark (documented in the README).

Each image (default 64 x 64) shows 1-3 non-overlapping objects on a plain background. An object has a shape, a
colour and optionally a size; `SceneConfig.jitter` varies object sides and the grey of the background without
changing any text. Every sample carries a templated caption, its gold scene graph, tight pixel boxes
with region captions, relations read off the geometry (the dominant axis between box centres), and hard negative
captions for evaluation. Splits follow the seen/unseen-pair protocol: a seeded fraction of the pairs of
(colour, shape) objects never appears together in training. Validation splits (and, with jitter, unjittered
test splits) come from their own seeded streams so that the training and test images never depend on them.
"""

import itertools
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
BACKGROUND = (200, 200, 200)
SIZES = {"small": 0.19, "medium": 0.25, "large": 0.31}  # object side as a fraction of the image side
JITTER_SIDE = (0.19, 0.33)  # with jitter: object side uniform in this range (fraction of the image side)
JITTER_GREY = (185, 215)  # with jitter: background (g, g, g), g uniform in this range per image
NEGATIVE_KINDS = ("attribute_swap", "relation_swap", "shape_replace", "colour_replace")
INVERSE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


@dataclass
class SceneConfig:
    """What the generator draws.

    `use_sizes` adds small/large objects (and the words to captions). `jitter` draws each object's side uniformly
    in `JITTER_SIDE` and a per-image grey background in `JITTER_GREY`, leaving captions, graphs and region texts
    as without it.
    """

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    use_sizes: bool = False
    held_out_fraction: float = 0.3
    shapes: tuple = SHAPES
    colours: tuple = tuple(COLOURS)
    margin: int = 2
    jitter: bool = False

    def __post_init__(self):
        if self.jitter and self.use_sizes:
            # a jittered side would contradict the size word in the caption
            raise ValueError("jitter and use_sizes cannot be combined: jittered sides would make size words lie")
        if not 1 <= self.min_objects <= self.max_objects <= 3:
            raise ValueError("objects per image must satisfy 1 <= min_objects <= max_objects <= 3")
        if not 0.0 <= self.held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must be in [0, 1), got {self.held_out_fraction}")
        unknown = [c for c in self.colours if c not in COLOURS] + [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown colours/shapes {unknown}")


@dataclass
class SceneObject:
    """One drawn object and its tight pixel box `[x0, y0, x1, y1]` (x1, y1 exclusive)."""

    shape: str
    colour: str
    size: str
    box: list = field(default_factory=list)

    def phrase(self, with_size: bool) -> str:
        """`"small red circle"` (size only when the config uses sizes)."""
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"

    @property
    def combo(self) -> tuple:
        """The (colour, shape) identity used for seen/unseen pairs."""
        return self.colour, self.shape


def relation_between(subject: list, obj: list) -> str:
    """Spatial predicate of `subject` relative to `obj` by the dominant axis between box centres."""
    dx = (subject[0] + subject[2]) / 2 - (obj[0] + obj[2]) / 2
    dy = (subject[1] + subject[3]) / 2 - (obj[1] + obj[3]) / 2
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def held_out_pairs(config: SceneConfig, seed: int) -> set:
    """The seeded set of unordered (colour, shape) pairs kept out of training."""
    combos = [(c, s) for c in config.colours for s in config.shapes]
    pairs = [frozenset(p) for p in itertools.combinations(combos, 2)]
    random.Random(seed).shuffle(pairs)
    return set(pairs[: int(round(config.held_out_fraction * len(pairs)))])


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: int, y: int, side: int, fill) -> None:
    x1, y1 = x + side - 1, y + side - 1
    if shape == "circle":
        draw.ellipse([x, y, x1, y1], fill=fill)
    elif shape == "square":
        draw.rectangle([x, y, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x + side / 2, y), (x1, y1), (x, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(x + side / 2, y), (x1, y + side / 2), (x + side / 2, y1), (x, y + side / 2)], fill=fill)
    else:  # cross: two bars a third of the side thick
        bar = max(2, side // 3)
        start = x + (side - bar) // 2, y + (side - bar) // 2
        draw.rectangle([x, start[1], x1, start[1] + bar - 1], fill=fill)
        draw.rectangle([start[0], y, start[0] + bar - 1, y1], fill=fill)


def _caption(objects: list, relations: list, with_size: bool) -> str:
    if not relations:
        return f"a {objects[0].phrase(with_size)}"
    clauses = [
        f"a {objects[s].phrase(with_size)} {predicate} a {objects[o].phrase(with_size)}"
        for s, predicate, o in relations
    ]
    return ", and ".join(clauses)


def _graph(objects: list, relations: list, with_size: bool) -> dict:
    return {
        "objects": [{"name": o.shape, "attributes": [o.size, o.colour] if with_size else [o.colour]} for o in objects],
        "relations": [{"subject": s, "predicate": p, "object": o} for s, p, o in relations],
    }


def _negatives(objects: list, relations: list, config: SceneConfig, rng: random.Random) -> dict:
    """Hard negative captions; a kind that would not change the caption is left out."""
    with_size = config.use_sizes
    positive = _caption(objects, relations, with_size)
    negatives = {}
    if len(objects) >= 2:
        a, b = objects[0], objects[1]
        if a.colour != b.colour:
            swapped = [SceneObject(o.shape, o.colour, o.size, o.box) for o in objects]
            swapped[0].colour, swapped[1].colour = b.colour, a.colour
            negatives["attribute_swap"] = _caption(swapped, relations, with_size)
        s, p, o = relations[0]
        flipped = [(o, p, s), *relations[1:]]
        if objects[s].phrase(with_size) != objects[o].phrase(with_size):
            negatives["relation_swap"] = _caption(objects, flipped, with_size)
    index = rng.randrange(len(objects))
    present = {o.shape for o in objects}
    shapes = [s for s in config.shapes if s not in present]
    if shapes:
        replaced = [SceneObject(o.shape, o.colour, o.size, o.box) for o in objects]
        replaced[index].shape = rng.choice(shapes)
        negatives["shape_replace"] = _caption(replaced, relations, with_size)
    colours = [c for c in config.colours if c not in {o.colour for o in objects}]
    if colours:
        recoloured = [SceneObject(o.shape, o.colour, o.size, o.box) for o in objects]
        recoloured[index].colour = rng.choice(colours)
        negatives["colour_replace"] = _caption(recoloured, relations, with_size)
    return {k: v for k, v in negatives.items() if v != positive}


def describe_scene(objects: list, config: SceneConfig, rng: random.Random) -> dict:
    """The sample dict (caption, graph, regions, negatives) of placed objects; relations come from their boxes."""
    relations = [(i, relation_between(objects[i].box, objects[i + 1].box), i + 1) for i in range(len(objects) - 1)]
    return {
        "caption": _caption(objects, relations, config.use_sizes),
        "scene_graph": _graph(objects, relations, config.use_sizes),
        "regions": [{"bbox": [float(v) for v in o.box], "text": o.phrase(config.use_sizes)} for o in objects],
        "negatives": _negatives(objects, relations, config, rng),
    }


def generate_scene(rng: random.Random, config: SceneConfig, allowed=None, num_objects: int | None = None):
    """One `(image, sample dict)`; `allowed(objects) -> bool` rejects object sets (used for the pair splits)."""
    count = num_objects or rng.randint(config.min_objects, config.max_objects)
    while True:
        objects = [
            SceneObject(
                rng.choice(config.shapes),
                rng.choice(config.colours),
                rng.choice(("small", "large")) if config.use_sizes else "medium",
            )
            for _ in range(count)
        ]
        if len({o.combo for o in objects}) == count and (allowed is None or allowed(objects)):
            break
    # Jitter draws only happen when it is on, so unjittered data keeps the exact random stream (and bytes).
    background = (rng.randint(*JITTER_GREY),) * 3 if config.jitter else BACKGROUND
    image = Image.new("RGB", (config.image_size, config.image_size), background)
    draw = ImageDraw.Draw(image)
    placed = []
    for obj in objects:
        fraction = rng.uniform(*JITTER_SIDE) if config.jitter else SIZES[obj.size]
        side = max(6, int(round(fraction * config.image_size)))
        for _ in range(1000):
            x = rng.randint(config.margin, config.image_size - side - config.margin)
            y = rng.randint(config.margin, config.image_size - side - config.margin)
            candidate = [x - config.margin, y - config.margin, x + side + config.margin, y + side + config.margin]
            if all(
                candidate[2] <= b[0] or b[2] <= candidate[0] or candidate[3] <= b[1] or b[3] <= candidate[1]
                for b in placed
            ):
                break
        else:
            return generate_scene(rng, config, allowed, num_objects)  # crowded: draw the whole scene again
        placed.append([x, y, x + side, y + side])
        mask = Image.new("L", image.size, 0)
        _draw(ImageDraw.Draw(mask), obj.shape, x, y, side, 255)
        obj.box = list(mask.getbbox())  # tight on the drawn pixels
        _draw(draw, obj.shape, x, y, side, COLOURS[obj.colour])
    return image, describe_scene(objects, config, rng)


def object_pairs(objects) -> set:
    """Unordered (colour, shape) pairs of an image's objects."""
    return {frozenset((a.combo, b.combo)) for a, b in itertools.combinations(objects, 2)}


def write_split(folder: Path, samples: list) -> Path:
    """An imagefolder (`docs/data.md`): PNGs plus `metadata.jsonl`."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "w") as handle:
        for index, (image, sample) in enumerate(samples):
            name = f"{index:06d}.png"
            image.save(folder / name)
            handle.write(json.dumps({"file_name": name, **sample}) + "\n")
    return folder


def _pair_splits(prefix: str, rng: random.Random, config: SceneConfig, held_out: set, count: int) -> dict:
    """Two-object `{prefix}seen` / `{prefix}unseen` splits (the latter only when pairs are held out)."""
    seen = lambda objects: not (object_pairs(objects) & held_out)  # noqa: E731
    unseen = lambda objects: bool(object_pairs(objects) & held_out)  # noqa: E731
    splits = {f"{prefix}seen": [generate_scene(rng, config, seen, num_objects=2) for _ in range(count)]}
    if held_out:
        splits[f"{prefix}unseen"] = [generate_scene(rng, config, unseen, num_objects=2) for _ in range(count)]
    return splits


def make_synthetic_dataset(
    output_dir: str | Path,
    num_images: int,
    seed: int = 0,
    config: SceneConfig | None = None,
    test_fraction=0.2,
    validation: bool = True,
) -> dict:
    """Write the split imagefolders and `held_out_pairs.json`; returns `{split: row count}`.

    `train/` and seen-pair splits only hold pairs outside the held-out set; unseen-pair splits are two-object
    scenes whose pair is held out. `num_images` counts training images; every other split gets `test_fraction`
    of it (at least 1). Splits: `train`, `test_seen`, `test_unseen`; with `validation`, `val_seen`, `val_unseen`
    (model selection); with `config.jitter`, also `test_seen_plain`, `test_unseen_plain` (same pairs, jitter off).
    Validation and plain splits use their own seeded streams: `train`/`test_*` bytes do not depend on them.
    """
    config = config or SceneConfig()
    held_out = held_out_pairs(config, seed)
    rng = random.Random(seed)
    seen = lambda objects: not (object_pairs(objects) & held_out)  # noqa: E731
    test_count = max(1, int(round(test_fraction * num_images)))
    splits = {"train": [generate_scene(rng, config, seen) for _ in range(num_images)]}
    splits.update(_pair_splits("test_", rng, config, held_out, test_count))
    if validation:
        splits.update(_pair_splits("val_", random.Random(f"{seed}:val"), config, held_out, test_count))
    if config.jitter:
        plain = replace(config, jitter=False)
        plain_splits = _pair_splits("test_", random.Random(f"{seed}:plain"), plain, held_out, test_count)
        splits.update({f"{name}_plain": samples for name, samples in plain_splits.items()})
    output_dir = Path(output_dir)
    for name, samples in splits.items():
        write_split(output_dir / name, samples)
    (output_dir / "held_out_pairs.json").write_text(
        json.dumps(sorted(sorted(list(map(list, pair))) for pair in held_out), indent=1)
    )
    return {name: len(samples) for name, samples in splits.items()}
