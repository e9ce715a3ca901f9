"""What the OpenAI-compatible HTTP API costs over gRPC: the same greedy generation against one
server in the same run (goal: HTTP within 5% of gRPC).

    python benchmarks/http_overhead.py [--threads 2] [--new-tokens 64] [--repeats 7]

One `memlm serve --http-port 0` (torch threads --threads); its clients in this process: memlm.Client
(gRPC Generate, streamed) and the openai client (POST /v1/completions, not streaming and streaming,
one keep-alive connection each). Every repeat runs the three in turn (a rotated order), so load from
other jobs on a shared machine falls on all three alike; figures are medians over the repeats. Time = request sent
to last token received (prefill included); tokens/s = completion tokens / that time, and every
protocol must report the same completion tokens and text (same greedy request). A 1-token request
measures the fixed per-request cost (prefill of a 5-token prompt plus the protocol). "protocol ms" is
wall time minus the engine's own total_ms (GenerationResult.timings, reported by both protocols):
the protocol's cost with the model's time, which load from other jobs inflates most, taken out.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

PROMPT = "Once upon a time, in a land far away, there lived a dragon who"  # continued well past 64 tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads (model.torch_threads)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import openai

    import memlm
    from memlm.services.process import ServerProcess

    env = {"MEMLM_MODEL__TORCH_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp), env=env, args=("--http-port", "0"))
        try:
            with memlm.Client(server.address, timeout=600) as grpc_client, openai.OpenAI(
                base_url=f"{server.http_url}/v1", api_key="none", max_retries=0, timeout=600
            ) as oai:
                model = oai.models.list().data[0].id

                # Each returns (text, completion tokens, the engine's own total_ms for the request).
                def over_grpc(prompt: str, n: int) -> tuple[str, int, float]:
                    stream = grpc_client.generate(prompt, memory="none", max_new_tokens=n, temperature=0)
                    text = "".join(stream)
                    return text, stream.result.completion_tokens, stream.result.timings.total_ms

                def over_http(prompt: str, n: int) -> tuple[str, int, float]:
                    r = oai.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)
                    return r.choices[0].text, r.usage.completion_tokens, r.memlm["timings"]["total_ms"]

                def over_http_stream(prompt: str, n: int) -> tuple[str, int, float]:
                    chunks = list(oai.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                                         stream=True, stream_options={"include_usage": True}))
                    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
                    return ("".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.completion_tokens,
                            final.memlm["timings"]["total_ms"])

                sides = {"gRPC Generate (stream)": over_grpc, "HTTP /v1/completions": over_http,
                         "HTTP /v1/completions stream": over_http_stream}
                for call in sides.values():  # warm-up: connections, allocations, and the prefix cache holding
                    call(PROMPT, 4)  # PROMPT for every side (a prefill from cached blocks may differ in the last bits)
                long = {name: [] for name in sides}
                short = {name: [] for name in sides}
                outputs = {}
                names = list(sides)
                for r in range(args.repeats):
                    for name in names[r % 3:] + names[: r % 3]:  # each protocol first in a third of the repeats
                        call = sides[name]
                        t0 = time.perf_counter()
                        text, tokens, engine_ms = call(PROMPT, args.new_tokens)
                        long[name].append((time.perf_counter() - t0, engine_ms / 1000))
                        outputs.setdefault(name, (text, tokens))
                        t0 = time.perf_counter()
                        call("The capital of France is", 1)
                        short[name].append(time.perf_counter() - t0)
        finally:
            server.terminate()

    texts = {out for out in outputs.values()}
    assert len(texts) == 1, f"the protocols disagree on the greedy output: {outputs}"
    tokens = next(iter(texts))[1]
    if tokens != args.new_tokens:
        print(f"note: the model stopped at its end-of-text after {tokens} of {args.new_tokens} tokens")
    base = "gRPC Generate (stream)"
    base_s = statistics.median(t for t, _ in long[base])
    base_short = statistics.median(short[base])
    print(f"server torch threads {args.threads}; {tokens} greedy tokens from a {len(PROMPT)}-character prompt; "
          f"median of {args.repeats} interleaved repeats")
    print(f"{'':28s} {'wall ms':>8s} {'tokens/s':>8s} {'vs gRPC':>7s} {'engine ms':>9s} {'protocol ms':>11s}  "
          f"{'1-token ms':>10s} {'vs gRPC':>7s}   every wall ms")
    for name in sides:
        s = statistics.median(t for t, _ in long[name])
        engine = statistics.median(e for _, e in long[name])
        protocol = statistics.median(t - e for t, e in long[name])  # wall - the engine's own time, per request
        one = statistics.median(short[name])
        every = " ".join(f"{t * 1000:.0f}" for t, _ in long[name])
        print(f"{name:28s} {s * 1000:8.1f} {tokens / s:8.1f} {s / base_s:7.3f} {engine * 1000:9.1f} "
              f"{protocol * 1000:11.1f}  {one * 1000:10.1f} {one / base_short:7.3f}   {every}")
    print("vs gRPC = median wall time / gRPC's (goal <= 1.05); protocol ms = median of (wall time - the engine's "
          "total_ms): what the protocol, server side and client side, adds to one request")


if __name__ == "__main__":
    main()
