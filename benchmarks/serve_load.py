"""A bounded load test of `circe serve` on loopback: throughput, latency, and no 5xx.

Renders a small synthetic gallery into /tmp, indexes it with `circe index`, starts the real
`circe serve` in a subprocess, and lets `--clients` concurrent clients (asyncio + httpx) send
`POST /search` requests back to back for `--seconds`: half name a gallery image as the
reference, half upload one; texts and k vary. Records completed requests per second,
latency percentiles, and the status codes; a 5xx (or a dropped connection) is a failure
and makes the script exit non-zero. The same load runs twice, against a server that
encodes every request on its own (`--batch-max 1`) and one that batches concurrent
requests (the defaults), so that batching is measured against its baseline in one run.
Writes benchmarks/results/serve_load.{json,md}.

    python benchmarks/serve_load.py                          # 20 clients for 30 s
    python benchmarks/serve_load.py --clients 4 --seconds 5  # smoke run

The server gets `--server-threads` torch threads (OMP_NUM_THREADS); the clients run in this
process, on the same machine, so they take some CPU from it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Self

import httpx
import numpy as np

from circe.data.render import render_scene
from circe.data.synthetic import random_scene

OUT = Path(__file__).resolve().parent / "results"
TEXTS = (
    "make it red",
    "add a small blue circle",
    "remove the triangle",
    "make the square bigger",
    "move the green diamond to the top left",
    "same scene but every shape is yellow",
    "replace the circle with a square",
    "add a large red triangle in the middle",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def circe(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "circe.cli", *arguments]


def prepare_index(root: Path, images: int, seed: int) -> Path:
    """A gallery of `images` synthetic scenes under `root`, indexed with `circe index`."""
    gallery, index = root / "gallery", root / "index"
    if not (index / "index.json").exists():
        gallery.mkdir(parents=True, exist_ok=True)
        rng = random.Random(seed)
        for i in range(images):
            render_scene(random_scene(rng), 128, jitter_seed=str(i)).save(
                gallery / f"scene-{i:04d}.png"
            )
        subprocess.run(
            circe("index", str(gallery), "--method", "sum", "--out", str(index)),
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return index


class Server:
    """`circe serve` in a subprocess, up until the `with` block ends."""

    def __init__(self, index: Path, threads: int, extra: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = circe("serve", "--index", str(index), "--port", str(self.port), *extra)
        self.threads, self.log = threads, log

    def __enter__(self) -> Self:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        self.log_file = self.log.open("w")
        self.process = subprocess.Popen(
            self.command, env=env, stdout=self.log_file, stderr=subprocess.STDOUT
        )
        deadline = time.time() + 120  # importing torch and loading the model takes a while
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"circe serve exited early; its output: {self.log}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.__exit__()
        raise RuntimeError(f"circe serve did not answer /healthz within 120 s; see {self.log}")

    def __exit__(self, *_) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log_file.close()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


async def load(url: str, server_pid: int, clients: int, seconds: float, seed: int) -> dict:
    """`clients` loops posting searches until `seconds` have passed -> measurements.

    Besides wall-clock figures, the server's CPU time per answered request is recorded: on
    a machine shared with other work, throughput depends on what else runs, CPU time per
    request much less so."""
    async with httpx.AsyncClient(
        base_url=url, timeout=60, limits=httpx.Limits(max_connections=clients)
    ) as http:
        page = (await http.get("/gallery", params={"limit": 500})).json()
        ids = [item["id"] for item in page["items"]]
        rng = random.Random(seed)
        uploads = [png(render_scene(random_scene(rng), 128)) for _ in range(16)]
        latencies: list[float] = []
        statuses: Counter[str] = Counter()
        failures: list[str] = []
        deadline = time.perf_counter() + seconds

        async def client(number: int) -> None:
            own = random.Random(seed * 1000 + number)
            while time.perf_counter() < deadline:
                data = {"text": own.choice(TEXTS), "k": str(own.choice((5, 10, 20, 50)))}
                files = None
                if own.random() < 0.5:
                    data["id"] = own.choice(ids)
                else:
                    files = {"image": ("ref.png", own.choice(uploads), "image/png")}
                started = time.perf_counter()
                try:
                    response = await http.post("/search", data=data, files=files)
                except httpx.TransportError as error:  # counted with the 5xx: a failure
                    statuses["connection error"] += 1
                    failures.append(f"{type(error).__name__}: {error}")
                    continue
                latencies.append((time.perf_counter() - started) * 1000)
                statuses[str(response.status_code)] += 1
                if response.status_code >= 500:
                    failures.append(f"{response.status_code}: {response.text[:200]}")

        started, server_cpu, client_cpu = (
            time.perf_counter(),
            cpu_seconds(server_pid),
            time.process_time(),
        )
        await asyncio.gather(*(client(n) for n in range(clients)))
        elapsed = time.perf_counter() - started
        server_cpu = cpu_seconds(server_pid) - server_cpu
        client_cpu = time.process_time() - client_cpu
        batching = (await http.get("/healthz")).json()["batching"]  # the server's batch sizes
    ms = np.array(latencies)
    server_errors = sum(n for s, n in statuses.items() if not s.isdigit() or int(s) >= 500)
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": int(sum(statuses.values())),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "latency_ms_p50": round(float(np.percentile(ms, 50)), 1),
        "latency_ms_p90": round(float(np.percentile(ms, 90)), 1),
        "latency_ms_p99": round(float(np.percentile(ms, 99)), 1),
        "latency_ms_max": round(float(ms.max()), 1),
        "server_cpu_ms_per_request": round(server_cpu * 1000 / max(1, len(latencies)), 1),
        "server_cpu_s": round(server_cpu, 1),
        "client_cpu_s": round(client_cpu, 1),
        "statuses": dict(sorted(statuses.items())),
        "batching": batching,
        "server_errors": server_errors,
        "first_failures": failures[:5],
    }


def publish(record: dict, out: Path, stem: str, text: str) -> None:
    """Write `stem`.json and `stem`.md under `out`, print the table, and fail the script when
    any run of the record saw server errors."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(text)
    if any(run["server_errors"] for run in record["runs"]):
        sys.exit(f"server errors (5xx or dropped connections) under load: see {stem}.json")


def markdown(record: dict) -> str:
    lines = [
        "# `circe serve` under load",
        "",
        (
            f"Generated by `{record['command']}` from `serve_load.json`: a {record['images']}-image "
            f"synthetic gallery (`sum` on circe-tiny), the server with {record['server_threads']} "
            f"torch thread(s), clients in the same machine's other process; {record['machine']}."
        ),
        (
            "Each client posts `/search` back to back (half by gallery id, half uploading a 128 px "
            "PNG; k in 5..50). Latency is per request, as the client sees it; server CPU "
            "ms/request is the server process's CPU time over the run / requests answered."
        ),
        "",
        (
            "| server | clients | s | requests | req/s | p50 ms | p90 ms | p99 ms | max ms "
            "| server CPU ms/request | mean batch | statuses | 5xx |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in record["runs"]:
        statuses = ", ".join(f"{k}: {v}" for k, v in run["statuses"].items())
        lines.append(
            f"| {run['server']} | {run['clients']} | {run['seconds']} | {run['requests']:,} "
            f"| {run['requests_per_s']} | {run['latency_ms_p50']} | {run['latency_ms_p90']} "
            f"| {run['latency_ms_p99']} | {run['latency_ms_max']} "
            f"| {run['server_cpu_ms_per_request']} | {run['batching']['mean_batch']} | {statuses} | {run['server_errors']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--images", type=int, default=300, help="synthetic gallery size")
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/circe-serve-load"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    index = prepare_index(args.workdir / f"gallery-{args.images}", args.images, args.seed)
    configurations = {
        "no batching (--batch-max 1)": ["--batch-max", "1"],
        "batching (defaults)": [],
    }
    runs = []
    for name, extra in configurations.items():
        with Server(index, args.server_threads, extra, args.workdir / "server.log") as server:
            run = asyncio.run(
                load(server.url, server.process.pid, args.clients, args.seconds, args.seed)
            )
        runs.append({"server": name, "server_command": " ".join(server.command[1:]), **run})
        print(json.dumps(runs[-1]), flush=True)
    record = {
        "command": " ".join(["python benchmarks/serve_load.py", *sys.argv[1:]]),
        "images": args.images,
        "server_threads": args.server_threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "runs": runs,
    }
    publish(record, args.out, "serve_load", markdown(record))


if __name__ == "__main__":
    main()
