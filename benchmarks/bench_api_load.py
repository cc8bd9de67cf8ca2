"""The served API under load and under attack, against a running server (`imoe serve`), on loopback.

Three phases, each printed as a table row:

1. baseline: `--clients` well-formed clients in a closed loop for `--seconds` (p50/p99 latency);
2. burst: the same clients, plus `--burst` requests fired at once in the middle of the window:
   every burst request must end (200, or a 429/503 at once), none may hang; the well-formed
   clients' p50 under the burst is compared with the baseline's (the ratio). A rejection's latency
   runs from the moment its request was written to the socket to its answer. `--floor` repeats
   the burst against a Serve application that rejects everything at once, on the same proxy and
   under the same clients: the floor that Ray Serve's HTTP path itself sets on this machine;
3. hostile: `--hostile` bad requests (seed 2**64, temperature 1e-50, oversized prompt and body, a
   thousand stop characters) sent while `--clients` well-formed requests are in flight: failures
   among the well-formed ones must be 0.

    imoe serve --store store --port 8000 --set serve.max_ongoing_requests=16 --set serve.max_queued_requests=32
    python benchmarks/bench_api_load.py --url http://127.0.0.1:8000/v1 [--key KEY]

Plain asyncio + aiohttp (a Ray dependency): no load-generator process to coordinate. `--floor`
connects to the server's Ray cluster (`ray.init(address="auto")`) to deploy the rejecting app.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp

GOOD = {"model": "imoe", "prompt": "How do I sort the rows of an array?", "max_tokens": 8, "temperature": 0}
HOSTILE = [{"seed": 2**64}, {"temperature": 1e-50}, {"prompt": "x" * 300_000}, {"prompt": "x" * 2_000_000},
           {"stop": ["s" * 1000]}]


async def one(session: aiohttp.ClientSession, url: str, body: dict, timeout: float,
              path: str = "/completions") -> tuple[int, float]:
    """(status, ms from the request written to the socket to the whole answer read); -1 if it hung."""
    marks: dict = {}
    started = time.perf_counter()
    try:
        async with session.post(f"{url}{path}", data=json.dumps(body), trace_request_ctx=marks,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            await r.read()
            return r.status, (time.perf_counter() - marks.get("sent", started)) * 1000
    except asyncio.TimeoutError:
        return -1, (time.perf_counter() - started) * 1000  # hung past the timeout


def _tracing() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()

    async def sent(session, ctx, params) -> None:
        if ctx.trace_request_ctx is not None:
            ctx.trace_request_ctx["sent"] = time.perf_counter()

    trace.on_request_chunk_sent.append(sent)
    return trace


async def closed_loop(session, url: str, clients: int, seconds: float) -> list[tuple[int, float]]:
    out: list[tuple[int, float]] = []
    end = time.perf_counter() + seconds

    async def client() -> None:
        while time.perf_counter() < end:
            out.append(await one(session, url, GOOD, 120))

    await asyncio.gather(*[client() for _ in range(clients)])
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def burst_under_load(session, args, burst_url: str, path: str = "/completions"):
    """The closed-loop clients on the API, with `--burst` requests fired at once at `burst_url`
    (the API, or the floor application) a third of the way in."""
    loop_task = asyncio.create_task(closed_loop(session, args.url, args.clients, args.seconds))
    await asyncio.sleep(args.seconds / 3)
    burst = await asyncio.gather(*[one(session, burst_url, GOOD, 120, path) for _ in range(args.burst)])
    return burst, await loop_task


def deploy_floor(root: str) -> str:
    """A Serve application on the server's proxy that answers every request 429 at once."""
    import ray
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0})
    class Reject:
        async def __call__(self, request):
            return JSONResponse({"error": {"message": "at capacity", "type": "rate_limit_error", "param": None,
                                           "code": "rate_limit_exceeded"}}, status_code=429, headers={"Retry-After": "1"})

    ray.init(address="auto", logging_level="ERROR")
    serve.run(Reject.bind(), name="bench-floor", route_prefix="/bench-floor")
    return root + "/bench-floor"


def latency_row(name: str, ms: list[float]) -> str:
    return (f"{name:<22} {len(ms):>6} {percentile(ms, 0.5):>8.1f} {percentile(ms, 0.99):>8.1f} "
            f"{max(ms, default=float('nan')):>8.1f} {sum(m <= 100 for m in ms) / max(1, len(ms)):>8.3f}")


async def main(args) -> None:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {args.key}"} if args.key else {})
    connector = aiohttp.TCPConnector(limit=0)
    floor_url = deploy_floor(args.url.rsplit("/v1", 1)[0]) if args.floor else None
    async with aiohttp.ClientSession(headers=headers, connector=connector, trace_configs=[_tracing()]) as session:
        base = await closed_loop(session, args.url, args.clients, args.seconds)
        burst, under = await burst_under_load(session, args, args.url)
        floor = (await burst_under_load(session, args, floor_url, path=""))[0] if floor_url else None
        good = [asyncio.create_task(one(session, args.url, GOOD | {"max_tokens": 16}, 300)) for _ in range(args.clients)]
        hostile = await asyncio.gather(*[one(session, args.url, GOOD | HOSTILE[i % len(HOSTILE)], 120)
                                         for i in range(args.hostile)])
        good_done = await asyncio.gather(*good)
    if floor_url is not None:
        from ray import serve

        serve.delete("bench-floor")

    ok = lambda rows: [ms for code, ms in rows if code == 200]  # noqa: E731
    rejected = [ms for code, ms in burst if code in (429, 503)]
    p50_base, p50_under = percentile(ok(base), 0.5), percentile(ok(under), 0.5)
    print(f"{'phase':<10} {'requests':>8} {'200':>6} {'429/503':>8} {'hung':>5} {'other':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for name, rows in (("baseline", base), ("burst", burst), ("under", under), ("hostile", hostile), ("good", good_done)):
        codes = [c for c, _ in rows]
        print(f"{name:<10} {len(rows):>8} {codes.count(200):>6} {sum(c in (429, 503) for c in codes):>8} "
              f"{codes.count(-1):>5} {sum(c not in (200, 429, 503, -1) for c in codes):>6} "
              f"{percentile([ms for _, ms in rows], 0.5):>8.1f} {percentile([ms for _, ms in rows], 0.99):>8.1f}")
    print()
    print(f"{'rejections':<22} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'<=100ms':>8}")
    print(latency_row("ours (429/503)", rejected))
    if floor is not None:
        floor_ms = [ms for code, ms in floor if code == 429]
        print(latency_row("floor: Serve rejects", floor_ms))
        print(f"ours / floor, p99: {percentile(rejected, 0.99) / percentile(floor_ms, 0.99):.2f}")
    print(f"well-formed p50 under the burst / without: {p50_under:.1f} / {p50_base:.1f} = {p50_under / p50_base:.2f} "
          f"(target <= 1.5)")
    print(f"well-formed failures next to {args.hostile} hostile requests: "
          f"{sum(c != 200 for c, _ in good_done)} of {len(good_done)} (target 0); hostile answered 4xx: "
          f"{sum(400 <= c < 500 for c, _ in hostile)} of {len(hostile)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--key", default=None, help="an API key, when the server has keys")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--hostile", type=int, default=100)
    parser.add_argument("--floor", action="store_true", help="also burst a Serve app that rejects at once (the floor)")
    asyncio.run(main(parser.parse_args()))
