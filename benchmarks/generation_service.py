"""Generation through the gRPC service against the same model called directly with
transformers, in the same run (goal: the service keeps at least 95% of the direct tokens/s).

    python benchmarks/generation_service.py [--new-tokens 128] [--runs 3]

Both sides: greedy, the same ~110-token prompt, EOS ignored so both make exactly --new-tokens
tokens; tokens/s = new tokens / wall time from request to last token (prefill included). The
server runs alone while it is measured, then the direct model runs in this process, so the two
never compete for the 2 cores.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPT = (
    "The history of the lighthouse at Kell begins in 1854, when the volcano buried the old harbour in ash. "
    "The engineers who rebuilt the harbour wall needed a light to guide the fishing boats home at night, "
    "and the town council voted to build a stone tower on the northern cliff. The first keeper was a "
    "young botanist who catalogued the plants of the cliffs while he tended the lamp. His letters, kept "
    "in the town archive, describe storms, shipwrecks and the long winters of the northern coast. "
    "Write the next chapter of this history in detail:\n"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    import memlm
    from memlm.services.process import ServerProcess

    service = []
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp))
        try:
            with memlm.Client(server.address, timeout=600) as client:
                client.generate("Hello", memory="none", max_new_tokens=4).result  # warm-up
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    result = client.generate(PROMPT, memory="none", max_new_tokens=args.new_tokens,
                                             stop=()).result
                    service.append(result.completion_tokens / (time.perf_counter() - t0))
                    prompt_tokens = result.prompt_tokens
        finally:
            server.terminate()

    import torch
    from memlm.models import load_causal_lm, load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(None)
    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    direct = []
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(args.runs):
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            direct.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0))

    s, d = statistics.median(service), statistics.median(direct)
    print(f"prompt {prompt_tokens} tokens, {args.new_tokens} new tokens, median of {args.runs}")
    print(f"service over gRPC        {s:6.1f} tokens/s  {['%.1f' % x for x in service]}")
    print(f"transformers generate()  {d:6.1f} tokens/s  {['%.1f' % x for x in direct]}")
    print(f"ratio service/direct: {s / d:.3f}  (goal >= 0.95)")


if __name__ == "__main__":
    main()
