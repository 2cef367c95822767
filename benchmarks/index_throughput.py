"""How fast `circe index` builds and how fast its engine searches, each against its limit.

One run measures:

1. Build throughput: images/s of `circe index`'s build path (`circe.index.build.build_index`:
   scan, decode, preprocess, embed, write shards, build the engine, commit) on a gallery
   of synthetic scenes (rendered once into /tmp, `--images`, 128 px PNGs), against the raw
   forward pass of the backbone on the same images already decoded and preprocessed in
   memory, which is the most any build could reach. The build is timed with each way
   `circe index` can decode: threads reading ahead of the encoder (the default), worker
   processes (`--workers`), and decoding in turn with encoding (`--decode-threads 0`, the
   build before reading ahead). Decoding + preprocessing is timed on its own too, on one
   thread. Each is timed `--repeats` times, interleaved, and the fastest run is kept (the
   machine is shared: the fastest run is the one least disturbed). The record says how
   many cores the process had and how many threads torch and the reader used.
2. Search: single-query latency (one query at a time, as the server runs them) of the
   engine `circe index` chooses by default (`build_engine` with default `EngineOptions`)
   against exact brute force (IndexFlatIP) at each of `--sizes` vectors, and the recall@10
   of the approximate index against the exact answer on held-out queries. Where the default
   is exact search (below 100k vectors), the approximate index is measured anyway, forced,
   so that its recall is known at every size.

Vectors are a Gaussian mixture on the unit sphere (real image embeddings form clusters;
`benchmarks/index_recall.py` also measures the structureless uniform case). Ratios are
against baselines measured in the same run. Writes benchmarks/results/index_throughput.{json,md}.

    python benchmarks/index_throughput.py                   # 2,000 images; 10k, 100k, 1M vectors
    python benchmarks/index_throughput.py --images 500 --sizes 10000 --queries 50   # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

# Run as a script, this file's folder is on sys.path: reuse the vector generator and the
# latency loop of the engine benchmark, so both benchmarks measure the same things the same way.
from index_recall import latencies_ms, make_vectors

from circe.backbones import load_backbone
from circe.data.images import load_rgb
from circe.data.render import render_scene
from circe.data.synthetic import random_scene
from circe.index.build import build_index
from circe.index.engine import EngineOptions, build_engine, exact_top_k, recall_at_k
from circe.index.files import scan_gallery
from circe.index.identity import MethodSource
from circe.index.reader import AUTO, available_cores, default_threads
from circe.methods import create_method

OUT = Path(__file__).resolve().parent / "results"


def synthetic_gallery(root: Path, count: int, size: int, seed: int) -> Path:
    """`count` rendered synthetic scenes under `root` (made once; reused when complete)."""
    done = root / f".complete-{count}-{size}-{seed}"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        scene = random_scene(rng)
        render_scene(scene, size, jitter_seed=str(i)).save(root / f"scene-{i:05d}.png")
    done.touch()  # hidden: `circe index` does not scan it
    return root


def measure_build(args: argparse.Namespace) -> dict:
    """Build throughput vs the backbone forward pass on the same images."""
    gallery = synthetic_gallery(
        Path(args.gallery or f"/tmp/circe-bench-gallery-{args.images}"),
        args.images,
        args.image_size,
        args.seed,
    )
    files, _ = scan_gallery(gallery)
    backbone = load_backbone("default")
    method = create_method(args.method, backbone).eval()

    def decode_all() -> tuple[float, torch.Tensor]:
        """Decode + preprocess on one thread, the reader's share of a build: (s, pixels)."""
        started = time.perf_counter()
        pixels = torch.stack([backbone.preprocess(load_rgb(gallery / f.path)) for f in files])
        return time.perf_counter() - started, pixels

    seconds, pixels = decode_all()
    read_times = [seconds]
    batches = torch.split(pixels, args.batch_size)  # each [b, 3, H, W]

    def forward() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                backbone.encode_image(batch)  # [b, D]
        return time.perf_counter() - started

    def build(reader: dict) -> float:
        with tempfile.TemporaryDirectory(prefix="circe-bench-index-") as index_dir:
            started = time.perf_counter()
            report = build_index(
                gallery,
                Path(index_dir),
                method,
                MethodSource(method=args.method),
                batch_size=args.batch_size,
                **reader,
            )
            elapsed = time.perf_counter() - started
        if report.images != len(files) or report.failed:
            raise RuntimeError(f"the benchmark gallery did not index cleanly: {report}")
        return elapsed

    readers = {  # how `circe index` can decode: the default first
        "threads": {"threads": args.decode_threads},
        "processes": {"workers": args.workers},
        "in turn": {"threads": 0},
    }
    forward()  # warm-up: first calls allocate and pick kernels
    forward_times = []
    build_times: dict[str, list[float]] = {name: [] for name in readers}
    for _ in range(args.repeats):  # interleaved, so that a busy spell hits all alike
        forward_times.append(forward())
        read_times.append(decode_all()[0])
        for name, reader in readers.items():
            build_times[name].append(build(reader))
    count = len(files)
    forward_rate = count / min(forward_times)
    threads = args.decode_threads if args.decode_threads != AUTO else default_threads()
    return {
        "images": count,
        "image_size": args.image_size,
        "method": args.method,
        "backbone": backbone.identity.short(),
        "batch_size": args.batch_size,
        "cores": available_cores(),
        "torch_threads": torch.get_num_threads(),
        "decode_threads": threads,
        "workers": args.workers,
        "repeats": args.repeats,
        "forward_images_per_s": round(forward_rate, 1),
        "decode_preprocess_images_per_s": round(count / min(read_times), 1),
        "builds": [
            {
                "reader": name,
                "images_per_s": round(count / min(times), 1),
                "vs_forward": round(count / min(times) / forward_rate, 3),
                "seconds": [round(t, 2) for t in times],
            }
            for name, times in build_times.items()
        ],
        "forward_s": [round(t, 2) for t in forward_times],
        "decode_preprocess_s": [round(t, 2) for t in read_times],
    }


def _latency_row(engine, name: str, held_out: np.ndarray, truth: np.ndarray, build_s: float):
    single = latencies_ms(engine, held_out, 10)
    return {
        "engine": name,
        "kind": engine.choice.kind,
        "params": engine.choice.params,
        "recall_at_10": round(recall_at_k(engine.search(held_out, 10)[1], truth), 4),
        "tuned_recall_at_10": round(engine.choice.recall_at_10, 4),
        "build_s": round(build_s, 2),
        "latency_ms_p50": round(float(np.median(single)), 3),
        "latency_ms_p99": round(float(np.percentile(single, 99)), 3),
    }


def measure_search(count: int, args: argparse.Namespace) -> dict:
    """The default engine (and the approximate one, where the default is exact) vs exact."""
    vectors, held_out = make_vectors("clustered", count, args.queries, args.dim, args.seed)
    truth = exact_top_k(held_out, vectors, 10)  # [Q, 10]

    def timed(options: EngineOptions):
        started = time.perf_counter()
        engine = build_engine(vectors, options)
        return engine, time.perf_counter() - started

    exact, exact_s = timed(EngineOptions(exact_below=count + 1))
    rows = [_latency_row(exact, "exact (baseline)", held_out, truth, exact_s)]
    chosen, chosen_s = timed(EngineOptions())
    rows.append(_latency_row(chosen, "chosen by default", held_out, truth, chosen_s))
    if chosen.choice.kind == "flat":
        forced = EngineOptions(exact_below=0, exact_if_missed=False)
        approximate, approximate_s = timed(forced)
        rows.append(_latency_row(approximate, "ivf (forced)", held_out, truth, approximate_s))
    for row in rows:
        row["speedup_vs_exact"] = round(rows[0]["latency_ms_p50"] / row["latency_ms_p50"], 2)
    print(json.dumps({"vectors": count, "rows": rows}), flush=True)
    return {"vectors": count, "dim": args.dim, "reason": chosen.choice.reason, "rows": rows}


def _reader_label(build: dict, record: dict) -> str:
    return {
        "threads": f"{record['decode_threads']} decoding thread(s) ahead (default)",
        "processes": f"{record['workers']} decoding process(es) ahead (`--workers`)",
        "in turn": "decoding in turn with encoding (`--decode-threads 0`)",
    }[build["reader"]]


def markdown(record: dict) -> str:
    b = record["build"]
    lines = [
        "# Index build throughput and search latency",
        "",
        (
            f"Generated by `{record['command']}` from `index_throughput.json`: "
            f"{record['threads']} torch/FAISS thread(s), {record['machine']}."
        ),
        "",
        "## Build throughput vs the backbone forward pass",
        "",
        (
            f"{b['images']:,} synthetic scenes ({b['image_size']} px PNGs), method `{b['method']}` on "
            f"`{b['backbone']}`, batch {b['batch_size']}; {b['cores']} cores, torch on "
            f"{b['torch_threads']} thread(s); fastest of {b['repeats']} interleaved runs. The "
            "forward pass runs on pixels already decoded and preprocessed in memory: the most a "
            "build can reach."
        ),
        "",
        "| stage | images/s | vs forward pass |",
        "|---|---|---|",
        f"| backbone forward pass (the limit) | {b['forward_images_per_s']:,} | 1.00 |",
        (
            f"| decode + preprocess only, one thread | {b['decode_preprocess_images_per_s']:,} "
            f"| {b['decode_preprocess_images_per_s'] / b['forward_images_per_s']:.2f} |"
        ),
        *(
            f"| `circe index` build, {_reader_label(build, b)} | {build['images_per_s']:,} "
            f"| {build['vs_forward']:.2f} |"
            for build in b["builds"]
        ),
        "",
        "## Search: the default engine vs exact brute force",
        "",
        (
            f"{record['dim']}-d clustered unit vectors; {record['queries']} held-out queries, one "
            "at a time (as the server runs them); recall@10 against the exact answer; speed-up = "
            "exact p50 / p50."
        ),
        "",
        "| vectors | engine | params | recall@10 | p50 ms | p99 ms | speed-up | build s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in record["search"]:
        for r in size["rows"]:
            params = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "—"
            lines.append(
                f"| {size['vectors']:,} | {r['engine']}: {r['kind']} | {params} "
                f"| {r['recall_at_10']:.3f} | {r['latency_ms_p50']} | {r['latency_ms_p99']} "
                f"| {r['speedup_vs_exact']}x | {r['build_s']} |"
            )
    lines += ["", "Why the default engine is what it is, per size (`circe index` prints this):", ""]
    lines += [f"- {size['vectors']:,}: {size['reason']}" for size in record["search"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="synthetic gallery size")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--gallery", help="where to render it (default /tmp/circe-bench-...)")
    parser.add_argument("--method", default="sum")
    parser.add_argument("--batch-size", type=int, default=64, help="as `circe index`")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes of the processes row (`--workers`)"
    )
    parser.add_argument(
        "--decode-threads", type=int, default=AUTO, help="threads of the default row (auto)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128, help="128: circe-tiny; 512: ViT-B")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    build = measure_build(args)
    print(json.dumps(build), flush=True)
    search = [measure_search(count, args) for count in args.sizes]
    record = {
        "command": " ".join(["python benchmarks/index_throughput.py", *sys.argv[1:]]),
        "threads": args.threads,
        "dim": args.dim,
        "queries": args.queries,
        "machine": (
            f"{platform.machine()}, {platform.platform()}, torch {torch.__version__}, "
            f"faiss {faiss.__version__}"
        ),
        "build": build,
        "search": search,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "index_throughput.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "index_throughput.md").write_text(markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
