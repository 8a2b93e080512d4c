"""Round-trip time (8 KiB) and one-way bandwidth (8 MiB, 64 MiB) between two processes for the
afd transport, gRPC (Python) and a Ray actor call, measured in one run; and the slot lanes'
round trips (8 KiB, 256 KiB, 8 MiB): the device lane's on CUDA (eager and in a CUDA graph; two
processes on one GPU need CUDA MPS), the proxy lane's over loopback (on CUDA also in a graph).

    python bench/transport.py [--json] [--device cpu|cuda] [--iters N] [--only afd|grpc|ray|lane]
        [--lanes device,proxy]

RTT: ping-pong of one message, median over `iters` after warm-up. Bandwidth: `reps` messages
sent back to back, then one small acknowledgement; bytes over the whole time, the median of
`trials` such streams after one warm-up stream. Every transport is measured the same way.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from concurrent import futures
from functools import partial
from typing import Any

# This script is named like afd's `transport` package; import the package, not the script.
import torch

SMALL, MEDIUM, LARGE = 8 << 10, 8 << 20, 64 << 20
TRIALS = 5
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 128 << 20),
    ("grpc.max_receive_message_length", 128 << 20),
]


def _bandwidth(stream: Callable[[], float], trials: int) -> float:
    """Median bytes/s of `trials` streams after one warm-up (first-touch costs are not rates)."""
    stream()
    return statistics.median(stream() for _ in range(trials))


def _streams(reps: int) -> list[tuple[int, int]]:
    """(size, messages per stream) of the bandwidth rows."""
    return [(MEDIUM, reps), (LARGE, max(2, reps // 4))]


def _tensor(nbytes: int, device: str) -> torch.Tensor:
    return torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)  # never zeros


# ---- afd transport --------------------------------------------------------------------------
def _afd_peer(address: object, device: str, plan: list[tuple[int, int]], settings: object) -> None:
    from afd.transport.endpoint import Transport
    from afd.transport.wire import RoundKey

    t = Transport(1, settings, device=device)
    t.connect(0, address)
    step = 0
    for count, echo in plan:
        for _ in range(count):
            (x,) = t.recv(0, RoundKey.exchange(step, 0, 0), 60)
            if echo:
                t.send(0, RoundKey.exchange(step, 0, 0), [x]).result(60)
            step += 1
        if not echo:
            t.send(
                0, RoundKey.exchange(step, 0, 0), [torch.ones(1, dtype=torch.uint8, device=device)]
            ).result(60)
            step += 1
    t.close()


def bench_afd(
    device: str, iters: int, reps: int, mode: str, spin_us: float, trials: int
) -> list[dict]:
    from afd.transport.endpoint import Transport, TransportSettings
    from afd.transport.wire import RoundKey

    settings = TransportSettings(progress_mode=mode, spin_us=spin_us)
    node = Transport(0, settings, device=device)
    plan = [(iters, True)] + [(n, False) for _, n in _streams(reps) for _ in range(trials + 1)]
    peer = mp.get_context("spawn").Process(
        target=_afd_peer, args=(node.address, device, plan, settings)
    )
    peer.start()
    node.wait_for_peers([1], 60)
    step = 0

    def ping(x: torch.Tensor) -> float:
        nonlocal step
        start = time.perf_counter()
        node.send(1, RoundKey.exchange(step, 0, 0), [x])
        node.recv(1, RoundKey.exchange(step, 0, 0), 60)
        step += 1
        return time.perf_counter() - start

    def stream(x: torch.Tensor, n: int) -> float:
        nonlocal step
        start = time.perf_counter()
        sends = [node.send(1, RoundKey.exchange(step + i, 0, 0), [x]) for i in range(n)]
        for s in sends:
            s.result(60)
        step += n
        node.recv(1, RoundKey.exchange(step, 0, 0), 60)
        step += 1
        return n * x.nbytes / (time.perf_counter() - start)

    small = _tensor(SMALL, device)
    rtt = statistics.median([ping(small) for _ in range(iters)][iters // 10 :])
    rows = [_row("afd", SMALL, rtt_s=rtt)]
    for size, n in _streams(reps):
        x = _tensor(size, device)
        rows.append(_row("afd", size, bw=_bandwidth(lambda x=x, n=n: stream(x, n), trials)))
    peer.join(60)
    node.close()
    return rows


# ---- gRPC ---------------------------------------------------------------------------------
def _grpc_server(port_queue: mp.Queue) -> None:
    import grpc

    def echo(request: bytes, context) -> bytes:
        return request

    def sink(request: bytes, context) -> bytes:
        return b"k"

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Sink": grpc.unary_unary_rpc_method_handler(sink),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Bench", handlers)])
    port_queue.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination(600)


def _on_device(data: bytes | object, device: str) -> None:
    """For GPU rows: what arrives goes back onto the GPU, as a GPU consumer would need it."""
    if device == "cuda":
        buf = data if isinstance(data, bytes) else data.tobytes()
        torch.frombuffer(bytearray(buf), dtype=torch.uint8).to(device)
        torch.cuda.synchronize()


def bench_grpc(iters: int, reps: int, trials: int, device: str = "cpu") -> list[dict]:
    """With device cuda, every message starts as a GPU tensor (copied to the host to send) and
    an echo ends on the GPU again; the server keeps what it receives in host memory."""
    import grpc

    ctx = mp.get_context("spawn")
    ports: mp.Queue = ctx.Queue()
    server = ctx.Process(target=_grpc_server, args=(ports,), daemon=True)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{ports.get(timeout=60)}", options=GRPC_OPTIONS)
    echo = channel.unary_unary("/bench.Bench/Echo")
    sink = channel.unary_unary("/bench.Bench/Sink")
    small = _tensor(SMALL, device)
    rtts = []
    for _ in range(iters):
        start = time.perf_counter()
        _on_device(echo(small.cpu().numpy().tobytes(), timeout=60), device)
        rtts.append(time.perf_counter() - start)
    rows = [_row("grpc", SMALL, rtt_s=statistics.median(rtts[iters // 10 :]))]
    for size, n in _streams(reps):
        payload = _tensor(size, device)

        def stream(payload: torch.Tensor = payload, n: int = n) -> float:
            start = time.perf_counter()
            for _ in range(n):
                sink(payload.cpu().numpy().tobytes(), timeout=60)
            return n * payload.nbytes / (time.perf_counter() - start)

        rows.append(_row("grpc", size, bw=_bandwidth(stream, trials)))
    channel.close()
    server.kill()
    return rows


# ---- Ray actor call -------------------------------------------------------------------------
def bench_ray(iters: int, reps: int, trials: int, device: str = "cpu") -> list[dict]:
    """GPU rows as for gRPC: host copies at the sender, the echo back onto the GPU."""
    import numpy as np
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
    )

    @ray.remote
    class Peer:
        def echo(self, x: np.ndarray) -> np.ndarray:
            return x

        def sink(self, x: np.ndarray) -> int:
            return int(x.nbytes)

    peer = Peer.remote()
    small = _tensor(SMALL, device)
    ray.get(peer.echo.remote(small.cpu().numpy()))
    rtts = []
    for _ in range(iters):
        start = time.perf_counter()
        _on_device(ray.get(peer.echo.remote(small.cpu().numpy())), device)
        rtts.append(time.perf_counter() - start)
    rows = [_row("ray", SMALL, rtt_s=statistics.median(rtts[iters // 10 :]))]
    for size, n in _streams(reps):
        payload = _tensor(size, device)

        def stream(payload: torch.Tensor = payload, n: int = n) -> float:
            start = time.perf_counter()
            ray.get([peer.sink.remote(payload.cpu().numpy()) for _ in range(n)])
            return n * payload.nbytes / (time.perf_counter() - start)

        rows.append(_row("ray", size, bw=_bandwidth(stream, trials)))
    ray.shutdown()
    return rows


# ---- afd slot lanes (device, proxy) -----------------------------------------------------------
LANE_SIZES = (8 << 10, 256 << 10, 8 << 20)
LANE_HIDDEN = 2048  # bf16 rows of 4 KiB, the Qwen3-30B-A3B hidden size
LANE_ROUNDS = 50  # rounds per step: a step's sequence numbers are step * rounds + round + 1
LARGE_ROWS = LANE_SIZES[-1] // (2 * LANE_HIDDEN)


def _lane_plan(iters: int, device: str) -> list[tuple[str, int, int, int]]:
    """(mode, rows, first step, steps) of every phase, the same in both processes (from step
    1: step 0 compiles the kernels)."""
    plan, step = [], 1
    steps = max(2, iters // LANE_ROUNDS)
    for mode in ("eager", "graph") if device == "cuda" else ("eager",):
        for size in LANE_SIZES:
            plan.append((mode, size // (2 * LANE_HIDDEN), step, steps + 1))  # +1: warm-up
            step += steps + 1
    return plan


def _open_lane(lane_name: str, first: bool, device: str, shared_memory: bool) -> Any:
    """The first process's end (combine slots, node 0) or the echo's (dispatch slots, node 1).
    `shared_memory`: the proxies' endpoints over UCX shared memory instead of TCP."""
    from afd.transport.endpoint import TransportSettings
    from afd.transport.lanes import open_lane
    from afd.transport.slots import SlotKind, SlotLayout

    kind, me, peer = (SlotKind.COMBINE, 0, 1) if first else (SlotKind.DISPATCH, 1, 0)
    layout = SlotLayout(kind, 1, 1, LARGE_ROWS, LANE_HIDDEN, 1, torch.bfloat16)
    return open_lane(
        lane_name, layout, me, [peer], LANE_ROUNDS, LANE_ROUNDS - 1, torch.device(device),
        TransportSettings(shared_memory=shared_memory), 60.0,
    )  # fmt: skip


def _lane_rounds(lane: Any, rows: int, source: torch.Tensor, first: bool) -> None:
    """One step of ping-pong rounds: the first process sends then waits, the echo waits then
    sends back what it got."""
    (peer, me) = lane.peers[0]
    for r in range(LANE_ROUNDS):
        if not first:
            lane.wait(r, 0, 10.0, [rows])
        peer.rows_MPCD[0, me, :rows].copy_(source[:rows], non_blocking=True)  # (proxy: pinned)
        lane.release(0, r, 0)
        if first:
            lane.wait(r, 0, 10.0, [rows])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _lane_phases(lane: Any, plan: list, source: torch.Tensor, first: bool) -> list[float]:
    """Runs every phase; seconds per round of each (timed on the first process)."""
    device = source.device.type
    out = []
    for mode, rows, step, steps in plan:
        run = partial(_lane_rounds, lane, rows, source, first)
        graph = None
        if mode == "graph":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
        start = 0.0
        for s in range(step, step + steps):
            if s == step + 1:  # after the warm-up step
                _sync(device)
                start = time.perf_counter()
            lane.begin_step(s, [[rows]])
            run() if graph is None else graph.replay()
        _sync(device)
        lane.check(f"{mode} {rows} rows")
        out.append((time.perf_counter() - start) / ((steps - 1) * LANE_ROUNDS))
    return out


def _lane_echo(
    lane_name: str, device: str, shared_memory: bool, handle: Any, plan: list, conn: Any
) -> None:
    lane = _open_lane(lane_name, False, device, shared_memory)
    conn.send(lane.handle)
    lane.connect([handle], 1)
    lane.begin_step(0, [[1]])  # compiles the kernels: not timed
    _lane_rounds(lane, 1, lane.own.rows_MPCD[0, 0], False)
    _lane_phases(lane, plan, lane.own.rows_MPCD[0, 0], False)
    lane.close()


def bench_slot_lane(
    lane_name: str, device: str, iters: int, shared_memory: bool = False
) -> list[dict]:
    """Round trips through a slot lane between two processes: each side writes the payload
    into the other's slot (device lane: its memory, on this GPU, MPS needed; proxy lane: its
    outbox, which the proxy threads move over UCX) and releases its word; eager, and on CUDA
    inside a CUDA graph (one replay per step)."""
    lane = _open_lane(lane_name, True, device, shared_memory)
    plan = _lane_plan(iters, device)
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    echo = ctx.Process(
        target=_lane_echo,
        args=(lane_name, device, shared_memory, lane.handle, plan, there),
        daemon=True,
    )
    echo.start()
    lane.connect([here.recv()], 0)
    payload = torch.randn(LARGE_ROWS, LANE_HIDDEN, device=device).to(torch.bfloat16)
    lane.begin_step(0, [[1]])
    _lane_rounds(lane, 1, payload, True)
    seconds = _lane_phases(lane, plan, payload, True)
    echo.join(60)
    got = lane.own.rows_MPCD[0, 0, : plan[-1][1]]
    assert torch.equal(got, payload[: plan[-1][1]]), "the echo came back different"
    lane.close()
    return [
        _row(
            f"{lane_name}{'-shm' if shared_memory else ''}-{mode}", rows * 2 * LANE_HIDDEN, rtt_s=s
        )
        for (mode, rows, _, _), s in zip(plan, seconds, strict=True)
    ]


def _row(transport: str, size: int, rtt_s: float | None = None, bw: float | None = None) -> dict:
    return {
        "transport": transport,
        "size_bytes": size,
        "rtt_us": None if rtt_s is None else round(rtt_s * 1e6, 1),
        "bandwidth_GBps": None if bw is None else round(bw / 1e9, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--reps", type=int, default=16)
    parser.add_argument("--trials", type=int, default=TRIALS)
    parser.add_argument("--only", choices=["afd", "grpc", "ray", "lane"], action="append")
    parser.add_argument(
        "--lanes",
        type=lambda s: s.split(","),
        default=None,
        help="slot lanes of the lane rows: device, proxy (default: both on CUDA, proxy on CPU)",
    )
    parser.add_argument(
        "--shared-memory",
        action="store_true",
        help="proxy lane rows: the proxies' endpoints over UCX shared memory, not TCP",
    )
    parser.add_argument("--progress-mode", default="blocking", choices=["blocking", "polling"])
    parser.add_argument("--spin-us", type=float, default=200.0)
    args = parser.parse_args()
    only = set(args.only or ["afd", "grpc", "ray", *(["lane"] if args.device == "cuda" else [])])
    rows = []
    if "afd" in only:
        rows += bench_afd(
            args.device, args.iters, args.reps, args.progress_mode, args.spin_us, args.trials
        )
    if "grpc" in only:
        rows += bench_grpc(args.iters, args.reps, args.trials, args.device)
    if "ray" in only:
        rows += bench_ray(args.iters, args.reps, args.trials, args.device)
    if "lane" in only:
        for lane_name in args.lanes or (
            ["device", "proxy"] if args.device == "cuda" else ["proxy"]
        ):
            rows += bench_slot_lane(lane_name, args.device, args.iters, args.shared_memory)
    if args.json:
        print(json.dumps({"device": args.device, "rows": rows}))
        return
    print(f"{'transport':<10}{'size':>12}{'rtt us':>12}{'GB/s':>10}")
    for r in rows:
        rtt = "" if r["rtt_us"] is None else f"{r['rtt_us']:.1f}"
        bw = "" if r["bandwidth_GBps"] is None else f"{r['bandwidth_GBps']:.3f}"
        print(f"{r['transport']:<10}{r['size_bytes']:>12}{rtt:>12}{bw:>10}")
    base = {(r["transport"], r["size_bytes"]): r for r in rows}
    if ("afd", SMALL) in base and ("grpc", SMALL) in base:
        print(
            f"afd vs gRPC: 8 KiB RTT {base['grpc', SMALL]['rtt_us'] / base['afd', SMALL]['rtt_us']:.1f}x faster, "
            f"8 MiB bandwidth {base['afd', MEDIUM]['bandwidth_GBps'] / base['grpc', MEDIUM]['bandwidth_GBps']:.1f}x higher"
        )


if __name__ == "__main__":
    main()
