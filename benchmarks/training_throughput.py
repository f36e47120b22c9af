"""Training throughput and peak memory of CLIP vs OC-CLIP vs CLOC with the package's training step
(`training.step.forward_backward` + AdamW), at a small config and at ViT-B/16, with 1 and 2 CPU processes.

Usage: `python benchmarks/training_throughput.py [--sizes small base] [--processes 1 2] [--steps 3]`.
Each measurement runs in a fresh process (2 processes: `torch.distributed.run`, gloo) so that peak RSS is its own;
the global batch is the same for 1 and 2 processes. Batches are random tensors of the processors' shapes:
captions of 16 tokens, scene graphs of 4 nodes and 2 relations (phrases of 6 tokens), 4 boxes per image.
"""

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time

import torch

SIZES = {
    # name: (vision width, layers, heads, image, patch, text width, layers, heads, projection, global batch)
    "small": (128, 4, 4, 64, 8, 128, 4, 4, 128, 64),
    "base": (768, 12, 12, 224, 16, 512, 12, 8, 512, 8),
}


def configs(size: str) -> dict:
    """Sub-config dicts of one size (CLIP vocabulary)."""
    vw, vl, vh, image, patch, tw, tl, th, proj, _ = SIZES[size]
    vision = dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl, num_attention_heads=vh)
    vision.update(image_size=image, patch_size=patch, projection_dim=proj)
    text = dict(hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=tl, num_attention_heads=th)
    text.update(projection_dim=proj, max_position_embeddings=77)
    return dict(text_config=text, vision_config=vision, projection_dim=proj)


def build(family: str, size: str):
    """A randomly initialised model of the family at `size`."""
    from transformers import CLIPConfig, CLIPModel

    from modeling_cloc import CLOCConfig, CLOCModel
    from modeling_occlip import OCCLIPConfig, OCCLIPModel

    torch.manual_seed(0)
    if family == "clip":
        return CLIPModel(CLIPConfig(**configs(size)))
    if family == "occlip":
        return OCCLIPModel(OCCLIPConfig(**configs(size)))
    return CLOCModel(CLOCConfig(**configs(size)))


def batch(family: str, size: str, rows: int, seed: int) -> dict:
    """Random inputs shaped as the processors make them."""
    generator = torch.Generator().manual_seed(seed)
    image = SIZES[size][3]
    data = {"pixel_values": torch.randn(rows, 3, image, image, generator=generator)}

    def tokens(*shape, length):
        ids = torch.randint(1, 49000, (*shape, length), generator=generator)
        ids[..., 0], ids[..., -1] = 49406, 49407
        return ids

    if family in ("clip", "cloc"):
        data["input_ids"] = tokens(rows, length=16)
    if family == "occlip":
        data.update(
            node_input_ids=tokens(rows, 4, length=6),
            node_mask=torch.ones(rows, 4, dtype=torch.bool),
            relation_input_ids=tokens(rows, 2, length=6),
            relation_mask=torch.ones(rows, 2, dtype=torch.bool),
            relation_subject_index=torch.tensor([[0, 2]]).repeat(rows, 1),
            relation_object_index=torch.tensor([[1, 3]]).repeat(rows, 1),
        )
    if family == "cloc":
        corners = torch.rand(rows, 4, 2, 2, generator=generator).sort(dim=2).values * 0.8
        data.update(
            input_boxes=torch.cat([corners[:, :, 0], corners[:, :, 1] + 0.1], dim=-1),
            box_mask=torch.ones(rows, 4, dtype=torch.bool),
            region_input_ids=tokens(rows, 4, length=8),
        )
    return data


def measure(family: str, size: str, steps: int) -> dict:
    """Run in this process (one of `WORLD_SIZE` processes): seconds per step and peak RSS."""
    from torch.nn.parallel import DistributedDataParallel

    from training.distributed import FeatureGatherer
    from training.families import get_family
    from training.step import ContrastiveTrainingModule, forward_backward

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    model = build(family, size).train()
    module = ContrastiveTrainingModule(model, get_family(family).objective(), FeatureGatherer())
    if world > 1:
        module = DistributedDataParallel(module, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = SIZES[size][-1] // world
    times = []
    for step in range(steps + 1):  # the first step warms up
        inputs = batch(family, size, rows, seed=step * world + rank)
        start = time.perf_counter()
        forward_backward(module, [inputs])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    if world > 1:
        peaks = torch.tensor([peak])
        torch.distributed.all_reduce(peaks)
        peak = float(peaks)
        torch.distributed.destroy_process_group()
    return {"seconds": seconds, "samples_per_second": SIZES[size][-1] / seconds, "peak_gib": peak}


def free_port() -> int:
    """A TCP port nobody listens on now (a fixed one may still be held by an earlier run)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "base"], choices=list(SIZES))
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--families", nargs="+", default=["clip", "occlip", "cloc"])
    parser.add_argument("--worker", nargs=2, metavar=("FAMILY", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = measure(*args.worker, args.steps)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result))
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, fp32, median of {args.steps} steps after 1 warm-up")
    print(f"{'size':6} {'model':7} {'procs':>5} {'global batch':>12} {'s/step':>8} {'samples/s':>10} {'peak GiB':>9}")
    baseline = {}
    for size in args.sizes:
        for processes in args.processes:
            for family in args.families:
                launcher = [sys.executable]
                if processes > 1:
                    launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
                    launcher += ["--master_port", str(free_port())]
                command = [*launcher, __file__, "--worker", family, size, "--steps", str(args.steps)]
                env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // processes))}
                done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode or not lines:
                    print(f"{size:6} {family:7} {processes:>5}  failed: {done.stderr[-500:]}")
                    continue
                result = json.loads(lines[0][7:])
                key = (size, processes)
                baseline.setdefault(key, result["seconds"] if family == "clip" else None)
                ratio = f"  ({result['seconds'] / baseline[key]:.2f}x CLIP)" if baseline.get(key) else ""
                print(
                    f"{size:6} {family:7} {processes:>5} {SIZES[size][-1]:>12} {result['seconds']:>8.3f} "
                    f"{result['samples_per_second']:>10.1f} {result['peak_gib']:>9.2f}{ratio}"
                )


if __name__ == "__main__":
    main()
