"""Rule-parser quality on the labelled captions in tests/data/parser_gold.jsonl (prints P/R/F1 and timing).

Objects, attribute-object bindings and relation triples are matched on spaCy lemmas. Targets: objects F1 >= 0.95,
attributes >= 0.90, relations >= 0.80. Usage: `python benchmarks/parser_quality.py [--gold FILE] [--show_errors]`.
"""

import argparse
import json
import time
from functools import cache
from pathlib import Path

from processing import RuleSceneGraphParser, SceneGraph, canonicalize_scene_graph
from processing.parser_metrics import graph_items, score_graphs
from processing.rule_parser import load_spacy

GOLD = Path(__file__).resolve().parents[1] / "tests" / "data" / "parser_gold.jsonl"
TARGETS = {"objects": 0.95, "attributes": 0.90, "relations": 0.80}


@cache
def lemma(text: str) -> str:
    """Lemmatised, lower-cased text ("dogs" -> "dog", "sitting on" -> "sit on")."""
    return " ".join(t.lemma_.lower() for t in load_spacy()(text))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gold", type=Path, default=GOLD)
    parser.add_argument("--show_errors", action="store_true")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.gold.read_text().splitlines() if line.strip()]
    # Gold labels predate the canonical predicate spellings ("left of"); compare like with like.
    gold = [
        canonicalize_scene_graph(SceneGraph.from_dict(r["scene_graph"], caption_index=i)) for i, r in enumerate(rows)
    ]
    rule = RuleSceneGraphParser()
    rule.parse("warm up")
    start = time.perf_counter()
    predicted = rule.parse_batch([r["caption"] for r in rows])
    elapsed = time.perf_counter() - start
    print(f"rule parser on {len(rows)} labelled captions ({elapsed / len(rows) * 1000:.1f} ms/caption)")
    for source in sorted({r["source"] for r in rows}) + ["all"]:
        keep = [i for i, r in enumerate(rows) if source in ("all", r["source"])]
        scores = score_graphs([predicted[i] for i in keep], [gold[i] for i in keep], lemma)
        print(f"  {source} ({len(keep)} captions)")
        for kind, s in scores.items():
            target = f"   target F1 >= {TARGETS[kind]:.2f}" if source == "all" else ""
            print(
                f"    {kind:<11} P {s['precision']:.3f}  R {s['recall']:.3f}  F1 {s['f1']:.3f}  (gold {s['gold']}){target}"
            )
    if args.show_errors:
        for row, pred, ref in zip(rows, predicted, gold):
            p, g = graph_items(pred, lemma), graph_items(ref, lemma)
            if p != g:
                print(
                    f"- {row['caption']}\n    predicted {dict(p['relations'])} {list(p['objects'])}\n"
                    f"    gold      {dict(g['relations'])} {list(g['objects'])}"
                )


if __name__ == "__main__":
    main()
