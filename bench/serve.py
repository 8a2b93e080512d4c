"""Load generator against afd's gRPC or OpenAI HTTP endpoint: TTFT, TPOT, inter-token latency,
throughput, errors.

    python bench/serve.py --local                       # starts the tiny 2+2 m=2 cluster itself
    python bench/serve.py --target HOST:PORT --rate 20 --requests 200 --json
    python bench/serve.py --http http://HOST:PORT --concurrency 16   # /v1/completions, SSE

Load is either a Poisson arrival rate (--rate, requests/s) or a fixed number of streams kept in
flight (--concurrency). Prompt and output lengths are drawn uniformly from the given ranges, with
a seed, so two runs send the same traffic. The baseline row, measured in the same run, sends the
same requests one at a time: what batching and the pipeline buy under load is the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

import aiohttp
import grpc
from afd.orchestrator.client import request
from afd.protos import afd_v1_pb2_grpc as pb_grpc

WORDS = [
    "the",
    "a",
    "model",
    "token",
    "expert",
    "attention",
    "node",
    "batch",
    "layer",
    "step",
    "cache",
    "route",
]


@dataclass
class Outcome:
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float = 0.0
    tokens: int = 0
    expected: int = 0
    status: str = "OK"
    start: float = field(default_factory=time.perf_counter)
    last: float = 0.0  # when the latest token came

    def arrived(self, tokens: int) -> None:
        """Notes `tokens` arriving now: the first arrival sets TTFT, later ones add an ITL."""
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.start
        else:
            self.itls.append(now - self.last)
        self.last, self.tokens = now, self.tokens + tokens

    def done(self) -> Outcome:
        self.e2e = time.perf_counter() - self.start
        return self


def _traffic(n: int, prompt_words: tuple[int, int], output: tuple[int, int], seed: int):
    rng = random.Random(seed)
    return [
        (
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(*prompt_words))),
            rng.randint(*output),
        )
        for _ in range(n)
    ]


async def _one(stub: pb_grpc.AfdStub, prompt: str, max_tokens: int, timeout_s: float) -> Outcome:
    out = Outcome(expected=max_tokens)
    try:
        async for r in stub.Generate(
            request(text=prompt, max_tokens=max_tokens, ignore_eos=True), timeout=timeout_s
        ):
            out.arrived(len(r.token_ids))
    except grpc.aio.AioRpcError as err:
        out.status = err.code().name
    return out.done()


async def _one_http(
    session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int, timeout_s: float
) -> Outcome:
    """One streamed /v1/completions request; each SSE chunk with a choice is one token."""
    out = Outcome(expected=max_tokens)
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with session.post(f"{url}/v1/completions", json=body, timeout=timeout) as resp:
            if resp.status != 200:
                out.status = f"HTTP_{resp.status}"
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[len(b"data: ") :])
                if "error" in chunk:
                    out.status = chunk["error"].get("type") or "STREAM_ERROR"
                    break
                if chunk.get("choices"):
                    out.arrived(1)
    except (aiohttp.ClientError, TimeoutError) as err:
        out.status = type(err).__name__
    return out.done()


async def run_load(
    target: str,
    traffic: list[tuple[str, int]],
    rate: float | None,
    concurrency: int | None,
    timeout_s: float,
    seed: int,
) -> tuple[list[Outcome], float]:
    """`target`: HOST:PORT of the gRPC API, or http://HOST:PORT of the OpenAI one."""
    rng = random.Random(seed + 1)
    async with contextlib.AsyncExitStack() as stack:
        if target.startswith(("http://", "https://")):
            connector = aiohttp.TCPConnector(limit=0)
            session = await stack.enter_async_context(aiohttp.ClientSession(connector=connector))

            def one(p: str, n: int) -> Awaitable[Outcome]:
                return _one_http(session, target, p, n, timeout_s)
        else:
            stub = pb_grpc.AfdStub(
                await stack.enter_async_context(grpc.aio.insecure_channel(target))
            )

            def one(p: str, n: int) -> Awaitable[Outcome]:
                return _one(stub, p, n, timeout_s)

        start = time.perf_counter()
        if concurrency is not None:
            gate = asyncio.Semaphore(concurrency)

            async def gated(p: str, n: int) -> Outcome:
                async with gate:
                    return await one(p, n)

            outcomes = await asyncio.gather(*(gated(p, n) for p, n in traffic))
        else:
            tasks = []
            for p, n in traffic:
                tasks.append(asyncio.create_task(one(p, n)))
                await asyncio.sleep(rng.expovariate(rate))
            outcomes = await asyncio.gather(*tasks)
        return list(outcomes), time.perf_counter() - start


def summarise(label: str, outcomes: list[Outcome], wall_s: float) -> dict:
    ok = [o for o in outcomes if o.status == "OK"]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.status != "OK":
            errors[o.status] = errors.get(o.status, 0) + 1
    short = sum(1 for o in ok if o.tokens != o.expected)  # finished but with the wrong count

    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        return (
            statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1e3
            if len(values) > 1
            else values[0] * 1e3
        )

    ttft = [o.ttft for o in ok if o.ttft is not None]
    tpot = [(o.e2e - o.ttft) / (o.tokens - 1) for o in ok if o.ttft is not None and o.tokens > 1]
    itl = [x for o in ok for x in o.itls]
    row = {
        "run": label,
        "requests": len(outcomes),
        "completed": len(ok),
        "errors": errors,
        "wrong_token_count": short,
    }
    for name, values in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}"] = pct(values, q)
    row["output_tokens_per_s"] = sum(o.tokens for o in ok) / wall_s
    row["requests_per_s"] = len(ok) / wall_s
    row["wall_s"] = wall_s
    return row


def _table(rows: list[dict]) -> str:
    cols = [
        ("run", "{:<10}"),
        ("completed", "{:>9}"),
        ("ttft_ms_p50", "{:>9.1f}"),
        ("ttft_ms_p99", "{:>9.1f}"),
        ("tpot_ms_p50", "{:>9.1f}"),
        ("tpot_ms_p99", "{:>9.1f}"),
        ("itl_ms_p50", "{:>9.1f}"),
        ("itl_ms_p90", "{:>9.1f}"),
        ("itl_ms_p99", "{:>9.1f}"),
        ("output_tokens_per_s", "{:>9.1f}"),
    ]
    heads = [
        "run",
        "done",
        "ttft p50",
        "ttft p99",
        "tpot p50",
        "tpot p99",
        "itl p50",
        "itl p90",
        "itl p99",
        "tok/s",
    ]
    lines = ["  ".join(f"{h:>9}" if i else f"{h:<10}" for i, h in enumerate(heads))]
    for r in rows:
        cells = []
        for key, fmt in cols:
            v = r[key]
            cells.append(fmt.format(v) if v is not None else f"{'-':>9}")
        lines.append("  ".join(cells) + (f"   errors {r['errors']}" if r["errors"] else ""))
    return "\n".join(lines) + "\n(ms; tok/s = output tokens per second over the run's wall time)"


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="HOST:PORT of a running afd gRPC endpoint")
    where.add_argument(
        "--http", help="http://HOST:PORT of a running afd OpenAI-compatible endpoint"
    )
    where.add_argument(
        "--local", action="store_true", help="start the tiny 2+2, m=2 cluster and serve it"
    )
    load = p.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="Poisson arrivals, requests per second")
    load.add_argument("--concurrency", type=int, help="streams kept in flight (default 32)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-words", type=int, nargs=2, default=(4, 24), metavar=("MIN", "MAX"))
    p.add_argument("--output-tokens", type=int, nargs=2, default=(8, 32), metavar=("MIN", "MAX"))
    p.add_argument(
        "--baseline-requests", type=int, default=8, help="sent one at a time first (0: skip)"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="per-request deadline, s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()
    if args.rate is None and args.concurrency is None:
        args.concurrency = 32

    server = None
    target = args.target or args.http
    if args.local:
        from afd.models.tiny import make_tiny_model
        from afd.orchestrator.cli import DEMO_MODEL_DIR
        from afd.orchestrator.config import Deployment, ModelSection
        from afd.orchestrator.server import BackgroundServer, with_ports

        if not (DEMO_MODEL_DIR / "config.json").is_file():
            make_tiny_model(DEMO_MODEL_DIR)
        d = with_ports(
            Deployment(model=ModelSection(path=str(DEMO_MODEL_DIR))).with_shape(2, 2, 2), None, 0, 0
        )
        server = BackgroundServer(d)
        target = server.start().grpc
    try:
        rows = []
        if args.baseline_requests:
            base = _traffic(
                args.baseline_requests,
                tuple(args.prompt_words),
                tuple(args.output_tokens),
                args.seed,
            )
            outcomes, wall = asyncio.run(run_load(target, base, None, 1, args.timeout, args.seed))
            rows.append(summarise("baseline", outcomes, wall))
        traffic = _traffic(
            args.requests, tuple(args.prompt_words), tuple(args.output_tokens), args.seed
        )
        outcomes, wall = asyncio.run(
            run_load(target, traffic, args.rate, args.concurrency, args.timeout, args.seed)
        )
        label = f"rate {args.rate:g}" if args.rate else f"conc {args.concurrency}"
        rows.append(summarise(label, outcomes, wall))
    finally:
        if server is not None:
            server.stop()
    load_desc = {
        "rate": args.rate,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "prompt_words": list(args.prompt_words),
        "output_tokens": list(args.output_tokens),
    }
    if args.json:
        print(json.dumps({"target": target, "load": load_desc, "rows": rows}))
    else:
        print(f"target {target}, load {load_desc}")
        print(_table(rows))
    return 0 if all(not r["errors"] and not r["wrong_token_count"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
