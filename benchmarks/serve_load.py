"""A bounded load test of ``fcnseg serve`` on 127.0.0.1: concurrent clients, mixed image sizes, some bad files.

Starts the real command as a process, sends REQUESTS uploads from CLIENTS threads (one connection per request,
the body sent after the server's 100 Continue, as curl does; a 503 is retried after its Retry-After), and reports
latency percentiles, throughput, the answers by status and the server's memory (VmRSS sampled during the run,
VmHWM at the end). Every mask a good request gets is compared byte for byte with what this process computes with
``fcnseg predict``'s own function on the same file; a request that gets no answer within --timeout counts as hung.
Exits 1 if any mask is wrong, any request is answered otherwise than expected, or any is lost or hung.

With --hostile the same load runs twice, each on a fresh server: once alone, then while --slow-clients connections
trickle their uploads (one byte every --trickle-interval seconds, never finishing; each reconnects when the server
ends it) and --idle-sockets connections stay open sending nothing (each reopened when the server closes it). It
reports both runs' latency and memory, the p50 and p99 ratios, and what the hostile connections got; it also exits
1 if the p99 latency under attack is more than twice the p99 alone.

python benchmarks/serve_load.py                              # 8 clients, 200 requests, FCN-8s at 1/4 width
python benchmarks/serve_load.py --queue 2                    # a short queue: some requests get 503 and retry
python benchmarks/serve_load.py --hostile --requests 120     # alone, then beside 8 slow uploads and 100 idle sockets
python benchmarks/serve_load.py --model runs/mine/best.pt --sizes 375x500 --json load.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import queue
import random
import re
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import fcnseg
from fcnseg.imageio import load_image
from fcnseg.inference import Predictor
from fcnseg.predict import save_prediction

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- the inputs


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    # Smooth random blobs (upsampled noise): a mask of several classes, not salt and pepper.
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_inputs(sizes: list[tuple[int, int]], max_pixels: int, upload_mb: float) -> dict[str, tuple[bytes, int]]:
    """name -> (file bytes, the status the server must answer): good images of every size in PNG and JPEG, and
    bad files (not an image, truncated, empty, over --max-pixels, over --max-upload-mb)."""
    files = {}
    for i, (h, w) in enumerate(sizes):
        files[f"photo{h}x{w}.png"] = (_encode(_photo(h, w, i), "PNG"), 200)
        files[f"photo{h}x{w}.jpg"] = (_encode(_photo(h, w, 100 + i), "JPEG"), 200)
    side = int(max_pixels**0.5) + 16
    files["notes.txt"] = (b"a text file, not an image\n" * 20, 400)
    files["truncated.png"] = (files[next(iter(files))][0][:500], 400)
    files["empty.jpg"] = (b"", 400)
    files[f"huge{side}x{side}.png"] = (_encode(np.zeros((side, side, 3), np.uint8), "PNG"), 413)
    files["oversized.bin"] = (os.urandom(int(upload_mb * 2**20) + 4096), 413)
    return files


def expected_masks(ckpt: Path, files: dict[str, tuple[bytes, int]]) -> dict[str, bytes]:
    """The mask ``fcnseg predict`` writes for each good file, computed in this process with its own function."""
    model = fcnseg.load(ckpt)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (data, status) in files.items():
            if status != 200:
                continue
            src = Path(tmp) / name
            src.write_bytes(data)
            save_prediction(Predictor(model), load_image(src), tmp, "mask")
            out[name] = (Path(tmp) / "mask.png").read_bytes()
    return out


# ---------------------------------------------------------------------------------------------- the server


def start_server(ckpt: Path, flags: list[str]) -> tuple[subprocess.Popen, tuple[str, int], list[str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "fcnseg", "serve", str(ckpt), "--port", "0", *flags]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    found: queue.Queue = queue.Queue()

    def drain() -> None:
        for line in proc.stderr:
            lines.append(line.rstrip())
            if m := re.search(r"on http://([\d.]+):(\d+)/ ", line):
                found.put(int(m.group(2)))
        found.put(None)

    threading.Thread(target=drain, daemon=True).start()
    port = found.get(timeout=300)
    if port is None:
        raise SystemExit("fcnseg serve did not start:\n" + "\n".join(lines))
    return proc, ("127.0.0.1", port), lines


def memory_kb(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) for k in ("VmRSS", "VmHWM")}


# ---------------------------------------------------------------------------------------------- the clients


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'.encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _read_response(stream) -> tuple[int, dict[str, str], bytes]:
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b"\n", b""):
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", 0))) if status != 100 else b""
    return status, headers, body


def one_request(address: tuple[str, int], name: str, data: bytes, timeout: float) -> tuple[int | str, dict, bytes]:
    """POST /predict as curl does for large uploads: the headers with ``Expect: 100-continue`` first, the body only
    after the server's 100 Continue, so a refusal (413, 503) comes before any of the body is sent."""
    body, content_type = _multipart(name, data)
    head = (f"POST /predict HTTP/1.1\r\nHost: {address[0]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")  # fmt: skip
    try:
        with socket.create_connection(address, timeout=timeout) as sock, sock.makefile("rb") as stream:
            sock.sendall(head.encode())
            status, headers, payload = _read_response(stream)
            if status == 100:
                sock.sendall(body)
                status, headers, payload = _read_response(stream)
            return status, headers, payload
    except TimeoutError:
        return "hung", {}, b""
    except (ConnectionError, ValueError, IndexError) as e:
        return f"connection closed ({type(e).__name__})", {}, b""


def client(address: tuple[str, int], jobs: queue.Queue, results: list, timeout: float) -> None:
    while True:
        try:
            name, data, want = jobs.get_nowait()
        except queue.Empty:
            return
        start, retries = time.perf_counter(), 0
        while True:
            status, headers, payload = one_request(address, name, data, timeout)
            if status != 503 or retries >= 50:
                break
            retries += 1
            time.sleep(float(headers.get("retry-after", 1)))
        results.append({"file": name, "want": want, "status": status, "retries": retries, "body": payload,
                        "ms": (time.perf_counter() - start) * 1000})  # fmt: skip


def sample_memory(pid: int, stop: threading.Event, samples: list[int]) -> None:
    while not stop.wait(0.1):
        try:
            samples.append(memory_kb(pid)["VmRSS"])
        except (OSError, AttributeError):
            return


# ---------------------------------------------------------------------------------------------- hostile clients


class Hostile:
    """Slow uploads and idle sockets against ``address``, each reopened when the server ends it, until stopped."""

    def __init__(self, address: tuple[str, int], slow: int, idle: int, interval: float) -> None:
        self.address, self.slow, self.idle, self.interval = address, slow, idle, interval
        self.stop = threading.Event()
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._trickle, daemon=True) for _ in range(slow)]
        self.threads.append(threading.Thread(target=self._idle, daemon=True))

    def __enter__(self) -> Hostile:
        for t in self.threads:
            t.start()
        time.sleep(2 * self.interval)  # every slow upload under way, every idle socket open
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def _trickle(self) -> None:
        body, content_type = _multipart("slow.png", os.urandom(100_000))
        head = (f"POST /predict HTTP/1.1\r\nHost: {self.address[0]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        while not self.stop.is_set():
            try:
                with socket.create_connection(self.address, timeout=5) as sock:
                    self._count("slow_connections")
                    sock.sendall(head)
                    self._count(self._dribble(sock, body))
            except OSError:
                self._count("slow_connection_errors")
                self.stop.wait(self.interval)

    def _dribble(self, sock: socket.socket, body: bytes) -> str:
        """One byte per interval until the server answers or closes; what it answered."""
        for i in range(len(body) - 1):  # never the last byte: the upload never completes
            if self.stop.wait(self.interval):
                return "slow_stopped_by_us"
            if select.select([sock], [], [], 0)[0]:
                answer = sock.recv(200)
                return f"slow_answered_{answer.split()[1].decode()}" if answer else "slow_closed"
            sock.sendall(body[i : i + 1])
        return "slow_body_exhausted"

    def _idle(self) -> None:
        socks: list[socket.socket] = []
        while not self.stop.is_set():
            while len(socks) < self.idle:
                try:
                    socks.append(socket.create_connection(self.address, timeout=5))
                    self._count("idle_opened")
                except OSError:
                    self._count("idle_connect_errors")
                    break
            ended = select.select(socks, [], [], 0.5)[0]
            for sock in ended:
                self._count("idle_closed_by_server" if not _recv_quietly(sock) else "idle_answered")
                sock.close()
                socks.remove(sock)
        for sock in socks:
            sock.close()


def _recv_quietly(sock: socket.socket) -> bytes:
    try:
        return sock.recv(200)
    except OSError:
        return b""


# ---------------------------------------------------------------------------------------------- report


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def report(results: list[dict], expected: dict[str, bytes], wall: float, memory: dict, args) -> dict:
    good = [r for r in results if r["want"] == 200]
    wrong = [r["file"] for r in good if r["status"] != 200 or r["body"] != expected[r["file"]]]
    refused = [r for r in results if r["want"] != 200]
    misanswered = [f"{r['file']}: {r['status']}" for r in refused if r["status"] != r["want"]]
    all_ms = [r["ms"] for r in results]
    good_ms = [r["ms"] for r in good if r["status"] == 200]
    return {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "model": args.model or f"fcn8s width {args.width}, random weights",
        "clients": args.clients, "requests": args.requests, "answered": len(results), "wall_s": round(wall, 2),
        "throughput_rps": round(len(results) / wall, 2), "good_per_s": round(len(good_ms) / wall, 2),
        "latency_ms_all": {q: round(pct(all_ms, q), 1) for q in (50, 95, 99)},
        "latency_ms_good": {q: round(pct(good_ms, q), 1) for q in (50, 95, 99)},
        "by_status": dict(sorted(Counter(str(r["status"]) for r in results).items())),
        "retried_after_503": sum(r["retries"] for r in results), "wrong_masks": wrong, "misanswered": misanswered,
        "hung": sum(r["status"] == "hung" for r in results), "server_memory_mb": memory,
        "server_flags": args.server_flags, "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }  # fmt: skip


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = re.search(r"^Model name:\s+(.+)$", out, re.M).group(1).strip()
        return f"{name}, {os.cpu_count()} cores"
    except (OSError, AttributeError):
        return platform.processor() or "unknown CPU"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="checkpoint or published weights name (default: FCN-8s at --width, random)")
    ap.add_argument("--width", type=float, default=0.25, help="channel width of the default model (default: 0.25)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--sizes", nargs="+", default=["96x128", "240x320", "375x500", "480x640"], metavar="HxW")
    ap.add_argument("--bad-share", type=float, default=0.1, help="share of requests that send a bad file")
    ap.add_argument("--workers-threads", type=int, default=1)
    ap.add_argument("--queue", type=int, default=8)
    ap.add_argument("--max-pixels", type=int, default=1_000_000)
    ap.add_argument("--max-upload-mb", type=float, default=2.0)
    ap.add_argument("--timeout", type=float, default=300, help="seconds before a request counts as hung")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--hostile", action="store_true", help="run alone, then beside slow uploads and idle sockets")
    ap.add_argument("--slow-clients", type=int, default=8, help="--hostile: connections trickling uploads")
    ap.add_argument("--idle-sockets", type=int, default=100, help="--hostile: connections sending nothing")
    ap.add_argument("--trickle-interval", type=float, default=1.0, help="--hostile: seconds between slow bytes")
    args = ap.parse_args()
    args.server_flags = ["--workers-threads", str(args.workers_threads), "--queue", str(args.queue), "--max-pixels",
                         str(args.max_pixels), "--max-upload-mb", str(args.max_upload_mb)]  # fmt: skip
    return run(args)


def _workload(files: dict[str, tuple[bytes, int]], args) -> list[tuple[str, bytes, int]]:
    rng = random.Random(args.seed)
    good = [n for n, (_, s) in files.items() if s == 200]
    bad = [n for n, (_, s) in files.items() if s != 200]
    n_bad = max(len(bad), round(args.requests * args.bad_share))
    names = [bad[i % len(bad)] for i in range(n_bad)] + [rng.choice(good) for _ in range(args.requests - n_bad)]
    rng.shuffle(names)
    return [(n, *files[n]) for n in names]


def run(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.model) if args.model else Path(tmp) / "model.pt"
        if not args.model:
            torch.manual_seed(args.seed)
            fcnseg.save_checkpoint(fcnseg.get_model("fcn8s", num_classes=21, width=args.width).eval(), ckpt)
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
        files = make_inputs(sizes, args.max_pixels, args.max_upload_mb)
        expected = expected_masks(ckpt, files)
        if args.hostile:
            _warm_up(args, ckpt, files)
        alone = _one_run(args, ckpt, files, expected, hostile=False)
        summary = _compare(alone, _one_run(args, ckpt, files, expected, hostile=True)) if args.hostile else alone
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    runs = [summary["alone"], summary["hostile"]] if args.hostile else [summary]
    lost = any(r["answered"] != args.requests or r["hung"] or r["wrong_masks"] or r["misanswered"] for r in runs)
    return 1 if lost or (args.hostile and summary["p99_ratio"] > 2) else 0


def _warm_up(args, ckpt: Path, files) -> None:
    """One request of each good file on a server of its own, unmeasured: ``--runtime auto`` measures and caches its
    kernels per layer shape on first use, which would otherwise count against whichever run came first."""
    proc, address, _ = start_server(ckpt, args.server_flags)
    try:
        for name, (data, status) in files.items():
            if status == 200:
                one_request(address, name, data, args.timeout)
    finally:
        proc.send_signal(2)
        proc.wait(60)


def _one_run(args, ckpt: Path, files, expected, hostile: bool) -> dict:
    """The load on a fresh server, alone or beside the hostile connections."""
    proc, address, log = start_server(ckpt, args.server_flags)
    try:
        before = memory_kb(proc.pid)
        if not hostile:
            return _load(args, proc, address, files, expected, before)
        with Hostile(address, args.slow_clients, args.idle_sockets, args.trickle_interval) as attack:
            summary = _load(args, proc, address, files, expected, before)
        summary["hostile_connections"] = dict(sorted(attack.counts.items()))
        summary["server_log_lines"] = len(log)
        return summary
    finally:
        proc.send_signal(2)
        proc.wait(60)


def _compare(alone: dict, hostile: dict) -> dict:
    """Both runs, and how the hostile one's latency compares (the good images' p50 and p99)."""
    ratio = {q: round(hostile["latency_ms_good"][q] / alone["latency_ms_good"][q], 2) for q in (50, 99)}
    return {"cpu": alone["cpu"], "p50_ratio": ratio[50], "p99_ratio": ratio[99], "alone": alone, "hostile": hostile}


def _load(args, proc, address, files, expected, before) -> dict:
    jobs: queue.Queue = queue.Queue()
    for job in _workload(files, args):
        jobs.put(job)
    results: list[dict] = []
    samples: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(proc.pid, stop, samples), daemon=True)
    sampler.start()
    threads = [
        threading.Thread(target=client, args=(address, jobs, results, args.timeout)) for _ in range(args.clients)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    stop.set()
    after = memory_kb(proc.pid)
    half = len(samples) // 2
    mb = {"rss_after_start": before["VmRSS"], "rss_max_first_half": max(samples[:half] or [0]),
          "rss_max_second_half": max(samples[half:] or [0]), "rss_at_end": after["VmRSS"],
          "peak_VmHWM": after["VmHWM"]}  # fmt: skip
    memory = {k: round(v / 1024, 1) for k, v in mb.items()}
    return report(results, expected, wall, memory, args)


if __name__ == "__main__":
    sys.exit(main())
