"""The scene-graph type used everywhere: parser output, dataset column (`scene_graph`) and processor input.

JSON form (`docs/occlip.md` §4)::

    {"objects": [{"name": "cube", "attributes": ["red"]}, {"name": "sphere", "attributes": ["blue"]}],
     "relations": [{"subject": 0, "predicate": "to the left of", "object": 1}]}

Node text is the attributes followed by the name ("red cube"); relation text is the predicate ("to the left of").

Every graph the processor sees, given by the user, stored in a dataset or parsed from a caption, goes through
`canonicalize_scene_graph`, so that the same scene always becomes the same tensors.
"""

from dataclasses import dataclass, field

# One spelling per spatial predicate. Multi-word predicates stay whole: they are the phrases captions (and the
# synthetic generator) use, so training graphs and parsed graphs read the same.
MULTIWORD_PREDICATES = (
    "to the left of",
    "to the right of",
    "in front of",
    "on top of",
    "in the middle of",
    "next to",
    "close to",
)
PREDICATE_VARIANTS = {
    "left of": "to the left of",
    "on the left of": "to the left of",
    "at the left of": "to the left of",
    "to the left side of": "to the left of",
    "on the left side of": "to the left of",
    "right of": "to the right of",
    "on the right of": "to the right of",
    "at the right of": "to the right of",
    "to the right side of": "to the right of",
    "on the right side of": "to the right of",
    "in the front of": "in front of",
    "at the top of": "on top of",
    "on the top of": "on top of",
    "on the side of": "beside",
    "in between": "between",
}

_OBJECT_KEYS = {"name", "attributes"}
_RELATION_KEYS = {"subject", "predicate", "object"}


def _where(caption_index: int | None) -> str:
    return "scene graph" if caption_index is None else f"caption {caption_index}: scene graph"


def _text(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class SceneObject:
    """One node: an object name and its attributes, in caption order."""

    name: str
    attributes: tuple[str, ...] = ()

    def __post_init__(self):
        # A string is a sequence of characters: `SceneObject("cube", "red")` would read as "r e d cube".
        if isinstance(self.attributes, (str, bytes)):
            raise TypeError(
                f"SceneObject {self.name!r}: attributes must be a list or tuple of strings, got the string "
                f"{self.attributes!r}; write attributes=({self.attributes!r},)"
            )
        if not isinstance(self.attributes, (list, tuple)):
            raise TypeError(
                f"SceneObject {self.name!r}: attributes must be a list or tuple of strings, "
                f"got {type(self.attributes).__name__}"
            )
        object.__setattr__(self, "attributes", tuple(self.attributes))  # frozen and hashable, as from_dict makes it

    @property
    def text(self) -> str:
        """Node text fed to the text tower: attributes then name ("red cube")."""
        return " ".join([*self.attributes, self.name])


@dataclass(frozen=True)
class SceneRelation:
    """One directed edge `subject --predicate--> object` between node indices."""

    subject: int
    predicate: str
    object: int


@dataclass(frozen=True)
class SceneGraph:
    """A validated scene graph: at least one object, relations between distinct, existing objects."""

    objects: tuple[SceneObject, ...]
    relations: tuple[SceneRelation, ...] = field(default_factory=tuple)

    def __post_init__(self):
        for part, kind in (("objects", SceneObject), ("relations", SceneRelation)):
            value = getattr(self, part)
            # A string or dict would be iterated into characters or keys; say what is expected instead.
            if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
                raise TypeError(
                    f"scene graph: {part!r} must be a list or tuple of {kind.__name__}, got {type(value).__name__}"
                    + ("; use SceneGraph.from_dict for the JSON form" if isinstance(value, dict) else "")
                )
            value = tuple(value)
            for i, item in enumerate(value):
                if not isinstance(item, kind):
                    raise TypeError(
                        f"scene graph: {part}[{i}] must be a {kind.__name__}, got {type(item).__name__} "
                        "(SceneGraph.from_dict reads the JSON form)"
                    )
            object.__setattr__(self, part, value)
        if not self.objects:
            raise ValueError("scene graph: 'objects' is empty; a graph needs at least one object")
        for i, obj in enumerate(self.objects):
            _text(obj.name, f"scene graph: objects[{i}].name")
            for j, attribute in enumerate(obj.attributes):
                _text(attribute, f"scene graph: objects[{i}].attributes[{j}]")
        for j, relation in enumerate(self.relations):
            _text(relation.predicate, f"scene graph: relations[{j}].predicate")
            for end in ("subject", "object"):
                index = getattr(relation, end)
                if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.objects):
                    raise ValueError(
                        f"scene graph: relations[{j}].{end} = {index!r} is not an index of the "
                        f"{len(self.objects)} objects"
                    )
            if relation.subject == relation.object:
                raise ValueError(f"scene graph: relations[{j}] links object {relation.subject} to itself")

    @classmethod
    def from_dict(cls, data: dict, caption_index: int | None = None) -> "SceneGraph":
        """Parse and validate the JSON form; errors name the caption index (when given) and the field."""
        where = _where(caption_index)
        if isinstance(data, SceneGraph):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a dict with 'objects' and 'relations', got {type(data).__name__}")
        unknown = set(data) - {"objects", "relations"}
        if unknown:
            raise ValueError(f"{where} has unknown field(s) {sorted(unknown)}; expected 'objects' and 'relations'")
        if "objects" not in data:
            raise ValueError(f"{where} is missing the field 'objects'")
        raw_objects, raw_relations = data["objects"], data.get("relations", [])
        if not isinstance(raw_objects, list):
            raise ValueError(f"{where}: 'objects' must be a list, got {type(raw_objects).__name__}")
        if not isinstance(raw_relations, list):
            raise ValueError(f"{where}: 'relations' must be a list, got {type(raw_relations).__name__}")
        objects = []
        for i, item in enumerate(raw_objects):
            if not isinstance(item, dict) or "name" not in item:
                raise ValueError(f"{where}: objects[{i}] must be a dict with a 'name', got {item!r}")
            if set(item) - _OBJECT_KEYS:
                raise ValueError(f"{where}: objects[{i}] has unknown field(s) {sorted(set(item) - _OBJECT_KEYS)}")
            attributes = item.get("attributes", [])
            if not isinstance(attributes, list):
                raise ValueError(f"{where}: objects[{i}].attributes must be a list, got {attributes!r}")
            objects.append(SceneObject(item["name"], tuple(attributes)))
        relations = []
        for j, item in enumerate(raw_relations):
            if not isinstance(item, dict) or set(item) != _RELATION_KEYS:
                raise ValueError(
                    f"{where}: relations[{j}] must be a dict with exactly 'subject', 'predicate', 'object', got {item!r}"
                )
            relations.append(SceneRelation(item["subject"], item["predicate"], item["object"]))
        try:
            return cls(tuple(objects), tuple(relations))
        except ValueError as error:
            raise ValueError(str(error).replace("scene graph", where, 1)) from None

    def to_dict(self) -> dict:
        """The JSON form; `SceneGraph.from_dict(g.to_dict()) == g` and `to_dict(from_dict(d)) == d`."""
        return {
            "objects": [{"name": o.name, "attributes": list(o.attributes)} for o in self.objects],
            "relations": [
                {"subject": r.subject, "predicate": r.predicate, "object": r.object} for r in self.relations
            ],
        }

    @property
    def node_texts(self) -> list[str]:
        """Text of each node, in node order ("red cube")."""
        return [o.text for o in self.objects]

    @property
    def relation_texts(self) -> list[str]:
        """Text of each relation: its predicate ("to the left of")."""
        return [r.predicate for r in self.relations]

    def truncate(self, max_nodes: int | None, max_relations: int | None) -> tuple["SceneGraph", bool]:
        """Keep the first `max_nodes` objects and the first `max_relations` relations among them.

        Returns the graph and whether anything was dropped.
        """
        objects = self.objects[:max_nodes] if max_nodes is not None else self.objects
        relations = [r for r in self.relations if r.subject < len(objects) and r.object < len(objects)]
        if max_relations is not None:
            relations = relations[:max_relations]
        truncated = len(objects) < len(self.objects) or len(relations) < len(self.relations)
        return SceneGraph(objects, tuple(relations)), truncated


def _collapse(text: str) -> str:
    return " ".join(text.split())


def canonical_predicate(predicate: str) -> str:
    """The one spelling of a predicate: lower-cased, whitespace collapsed, variants mapped ("left of" ->
    "to the left of")."""
    predicate = _collapse(predicate.lower())
    return PREDICATE_VARIANTS.get(predicate, predicate)


def canonicalize_scene_graph(graph: SceneGraph | dict, merge_duplicates: bool = True) -> SceneGraph:
    """The canonical form of a graph (a `SceneGraph` or its JSON form); idempotent.

    Predicates get their one spelling (`canonical_predicate`); names and attributes get whitespace collapsed.
    With `merge_duplicates`, nodes with identical text become the first of them: a caption that mentions
    "a blue square" twice describes one square, and identical queries would get identical slots anyway.
    Relations are remapped; self-loops and repeated (subject, predicate, object) triples are dropped.
    """
    graph = SceneGraph.from_dict(graph)
    objects = [SceneObject(_collapse(o.name), tuple(_collapse(a) for a in o.attributes)) for o in graph.objects]
    remap = list(range(len(objects)))
    if merge_duplicates:
        first: dict[str, int] = {}
        kept = []
        for i, obj in enumerate(objects):
            if obj.text not in first:
                first[obj.text] = len(kept)
                kept.append(obj)
            remap[i] = first[obj.text]
        objects = kept
    relations, seen = [], set()
    for r in graph.relations:
        edge = (remap[r.subject], canonical_predicate(r.predicate), remap[r.object])
        if edge[0] != edge[2] and edge not in seen:
            seen.add(edge)
            relations.append(SceneRelation(*edge))
    return SceneGraph(tuple(objects), tuple(relations))
