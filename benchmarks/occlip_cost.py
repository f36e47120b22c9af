"""OC-CLIP cost on CPU, measured in one run and printed as ratios (spec: issue "Package foundation").

(a) Train-step time of OC-CLIP vs a plain transformers CLIP with the same towers and batch, at a small config
    and at ViT-B/16 dimensions. Target: <= 1.5x.
(b) Scoring images x captions from cached features at ViT-B/16 dimensions (4 nodes, 2 relations per caption):
    exhaustive all-pairs throughput (pairs/s, peak memory, fraction of this machine's dense-matmul FLOP/s,
    target >= 50%), and `rerank` of a top-50 global-CLIP shortlist vs the ViT-B/16 image-encoder pass over the
    same images (target <= 0.5x).

Usage: `python benchmarks/occlip_cost.py [--part a|b|all]`; `--help` lists the sizes. Exhaustive scoring of the
full grid takes ~20 min on 2 cores, so by default a slice of the captions is timed against all images and the
full-grid time is extrapolated (pass `--timed_captions 1000` for the whole grid).
"""

import argparse
import threading
import time

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPConfig, CLIPModel

from modeling_occlip import OCCLIPConfig, OCCLIPModel
from modeling_occlip.modeling_occlip import OCCLIPGraphFeatures, OCCLIPImageFeatures

EOS = 49407


class PeakRSS:
    """Samples this process's resident memory in a thread; `peak - start` is the extra memory of a block."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.process = interval, psutil.Process()

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def extra_gib(self) -> float:
        return (self.peak - self.start) / 2**30


def tower_configs(size: str, binding_width: int | None) -> tuple[dict, dict, dict]:
    """Text, vision and binding sub-config dicts shared by CLIP and OC-CLIP."""
    if size == "small":  # a "22M CLIP": width 256, 6 layers, 64 px, patch 8
        text = dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_attention_heads=4,
            max_position_embeddings=20,
            projection_dim=256,
        )
        vision = dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_attention_heads=4,
            image_size=64,
            patch_size=8,
            projection_dim=256,
        )
    else:  # ViT-B/16 at 224 px with the CLIP-B text tower
        base = OCCLIPConfig()
        text = {
            k: getattr(base.text_config, k)
            for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "projection_dim")
        }
        vision = {
            k: getattr(base.vision_config, k)
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "image_size",
                "patch_size",
                "projection_dim",
            )
        }
    binding = {} if binding_width is None else {"hidden_size": binding_width}
    return text, vision, binding


def random_graph_batch(batch: int, nodes: int, relations: int, generator: torch.Generator) -> dict:
    """Graphs with `nodes` 2-word node phrases and `relations` 2-word predicates, as the processor would pad them."""
    length = 6

    def phrases(count, words):
        ids = torch.full((batch, count, length), EOS)
        ids[:, :, 0] = 49406
        ids[:, :, 1 : 1 + words] = torch.randint(400, 40000, (batch, count, words), generator=generator)
        mask = torch.zeros_like(ids)
        mask[:, :, : words + 2] = 1
        return ids, mask

    node_ids, node_attn = phrases(nodes, 2)
    rel_ids, rel_attn = phrases(relations, 2)
    subject = torch.arange(relations).remainder(nodes).expand(batch, -1).clone()
    return dict(
        node_input_ids=node_ids,
        node_attention_mask=node_attn,
        relation_input_ids=rel_ids,
        relation_attention_mask=rel_attn,
        relation_subject_index=subject,
        relation_object_index=(subject + 1).remainder(nodes),
    )


def time_train_steps(model, inputs: dict, steps: int) -> tuple[float, float]:
    """Median seconds of forward + backward + AdamW step, and the FLOPs of one step (counted in the warm-up)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times, flops = [], 0.0
    for step in range(steps + 1):
        counter = FlopCounterMode(display=False) if step == 0 else None
        start = time.perf_counter()
        with counter or torch.enable_grad():
            loss = model(**inputs, return_loss=True).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - start)
        else:
            flops = counter.get_total_flops()
    return sorted(times)[len(times) // 2], flops


def part_a(args) -> None:
    print("\n(a) train step, OC-CLIP vs CLIP (same towers, same batch; forward + backward + AdamW), fp32 CPU")
    print(
        f"{'config':<34}{'batch':>6}{'CLIP s/step':>13}{'OC-CLIP s/step':>16}{'ratio':>8}{'FLOP ratio':>12}"
        "   target <= 1.5x"
    )
    runs = [
        ("small", args.small_batch, None),
        ("small", args.small_batch, args.small_binding_width),
        ("small", args.small_batch // 2, None),
        ("vit-b/16", args.b16_batch, None),
    ]
    for size, batch, width in runs:
        if width is not None and width <= 0:
            continue
        text, vision, binding = tower_configs(size, width)
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randn(batch, 3, vision["image_size"], vision["image_size"], generator=generator)
        torch.manual_seed(0)
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=text["projection_dim"]))
        captions = torch.randint(400, 40000, (batch, args.caption_tokens), generator=generator)
        captions[:, 0], captions[:, -1] = 49406, EOS
        steps = args.steps if size == "vit-b/16" else 2 * args.steps + 1
        clip_time, clip_flops = time_train_steps(clip, dict(pixel_values=pixels, input_ids=captions), steps)
        del clip
        occlip = OCCLIPModel(
            OCCLIPConfig(
                text_config=text, vision_config=vision, binding_config=binding, projection_dim=text["projection_dim"]
            )
        )
        graphs = random_graph_batch(batch, args.nodes, args.relations, generator)
        occlip_time, occlip_flops = time_train_steps(occlip, dict(pixel_values=pixels, **graphs), steps)
        d = occlip.config.binding_width
        name = f"{size} (binding width {d})"
        print(
            f"{name:<34}{batch:>6}{clip_time:>13.3f}{occlip_time:>16.3f}{occlip_time / clip_time:>7.2f}x"
            f"{occlip_flops / clip_flops:>11.2f}x"
        )
        del occlip


def matmul_gflops(rows: int, inner: int, cols: int, repeats: int = 5) -> float:
    """This machine's dense fp32 matmul throughput at a size like the slot MLP's."""
    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * rows * inner * cols * repeats / (time.perf_counter() - start) / 1e9


@torch.no_grad()
def part_b(args) -> None:
    print(
        f"\n(b) scoring from cached features at ViT-B/16 dimensions ({args.nodes} nodes, {args.relations} relations "
        f"per caption, {args.num_images} images x {args.num_captions} captions)"
    )
    torch.manual_seed(0)
    model = OCCLIPModel(OCCLIPConfig()).eval()
    generator = torch.Generator().manual_seed(1)
    vision = model.config.vision_config
    num_patches = (vision.image_size // vision.patch_size) ** 2

    # Image side: the image encoder is timed on a subset; the cached keys/values of all images come from patch tokens.
    encoder_images = torch.randn(args.encoder_batch, 3, vision.image_size, vision.image_size, generator=generator)
    model.get_image_features(encoder_images[:2])
    start = time.perf_counter()
    model.get_image_features(encoder_images)
    encoder_per_image = (time.perf_counter() - start) / args.encoder_batch
    keys, values = [], []
    for i in range(0, args.num_images, 100):
        patches = torch.randn(min(100, args.num_images - i), num_patches, vision.hidden_size, generator=generator)
        k, v = model.binding.encode_image(patches)
        keys.append(k)
        values.append(v)
    images = OCCLIPImageFeatures(binding_keys=torch.cat(keys), binding_values=torch.cat(values))
    del keys, values
    text = model.get_graph_features(**random_graph_batch(args.num_captions, args.nodes, args.relations, generator))
    cache_mib = (images.binding_keys.numel() + images.binding_values.numel()) * 4 / 2**20 / args.num_images
    print(
        f"  per-image cache (keys+values, {model.config.binding_config.num_hidden_layers} layers, fp32): "
        f"{cache_mib:.2f} MiB"
    )

    def captions(sl):
        return OCCLIPGraphFeatures(**{k: v[sl] for k, v in text.items()})

    with FlopCounterMode(display=False) as counter:
        model.score(
            OCCLIPImageFeatures(binding_keys=images.binding_keys[:2], binding_values=images.binding_values[:2]),
            captions(slice(0, 8)),
        )
    flops_per_pair = counter.get_total_flops() / 16

    timed = captions(slice(0, args.timed_captions))
    model.score(
        OCCLIPImageFeatures(binding_keys=images.binding_keys[:4], binding_values=images.binding_values[:4]), timed
    )  # warm-up
    with PeakRSS() as memory:
        start = time.perf_counter()
        logits = model.score(images, timed)
        elapsed = time.perf_counter() - start
    pairs = logits.numel()
    achieved = flops_per_pair * pairs / elapsed / 1e9
    queries = args.nodes + model.config.binding_config.num_default_queries
    width = model.config.binding_width
    peak = matmul_gflops(model.config.pair_chunk_size * queries // 4, width, int(width * 4))
    full_pairs = args.num_images * args.num_captions
    print(
        f"  exhaustive: {pairs} pairs in {elapsed:.1f}s = {pairs / elapsed:.0f} pairs/s "
        f"({flops_per_pair / 1e6:.1f} MFLOP/pair); full {args.num_images}x{args.num_captions} grid: "
        f"{full_pairs / (pairs / elapsed):.0f}s{' (extrapolated)' if pairs < full_pairs else ''}"
    )
    print(
        f"  peak extra memory while scoring (pair_chunk_size={model.config.pair_chunk_size}): "
        f"{memory.extra_gib:.2f} GiB"
    )
    print(
        f"  achieved {achieved:.1f} GFLOP/s vs dense matmul {peak:.1f} GFLOP/s on this machine: "
        f"{100 * achieved / peak:.0f}%   target >= 50%"
    )

    global_logits = torch.randn(args.num_captions, args.num_images, generator=generator)
    model.rerank(images, captions(slice(0, 2)), global_logits[:2], top_k=args.top_k)  # warm-up
    start = time.perf_counter()
    out = model.rerank(images, text, global_logits, top_k=args.top_k)
    rerank_time = time.perf_counter() - start
    encoder_time = encoder_per_image * args.num_images
    print(
        f"  rerank top-{args.top_k} for {args.num_captions} captions ({out.indices.numel()} pairs): "
        f"{rerank_time:.1f}s; ViT-B/16 image encoder over {args.num_images} images: {encoder_time:.1f}s "
        f"(extrapolated from {args.encoder_batch}); ratio {rerank_time / encoder_time:.2f}x   target <= 0.5x"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["a", "b", "all"], default="all")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps per model (after one warm-up)")
    parser.add_argument("--small_batch", type=int, default=64)
    parser.add_argument("--small_binding_width", type=int, default=128, help="second small run; 0 to skip")
    parser.add_argument("--b16_batch", type=int, default=16)
    parser.add_argument("--caption_tokens", type=int, default=20, help="CLIP caption length (OC-CLIP's context)")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--relations", type=int, default=2)
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--num_captions", type=int, default=1000)
    parser.add_argument("--timed_captions", type=int, default=50, help="captions scored against all images")
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--encoder_batch", type=int, default=16)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.part in ("a", "all"):
        part_a(args)
    if args.part in ("b", "all"):
        part_b(args)


if __name__ == "__main__":
    main()
