"""Peak memory and time of the log-prob head alone: one-shot vs chunked (``model.logp_chunk_size``).

The head is the output layer (hidden -> vocabulary, no bias, as GPT-2's and Llama's) followed by the float32
gather − logsumexp, run forward and backward on N response positions, as in a DPO step with
``model.score_response_only``. One-shot is :func:`dpo_lightning.logps.token_logps` of all (N, V) logits at once;
chunked is :func:`dpo_lightning.logps.chunked_token_logps`. Each configuration runs in a fresh subprocess, so its
peak RSS (VmHWM, reset after set-up) is its own; "head MiB" is that peak above the RSS before the head ran
(weights, hidden states and libraries excluded).

    python -m dpo_lightning.bench.chunked_head                # vocab 50,257 and 128,256, d 512, N 2,048
    python -m dpo_lightning.bench.chunked_head --vocab 8192 --positions 256 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from dpo_lightning.bench.probes import peak_rss_mb, reset_peak_rss, rss_mb
from dpo_lightning.logps import chunked_token_logps, token_logps


def measure(vocab: int, d_model: int, positions: int, chunk: int | None, repeats: int) -> dict[str, float]:
    """Head MiB above the pre-head RSS (first step), and the median seconds of a forward+backward (later steps)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(d_model, vocab, bias=False)
    hidden = torch.randn(positions, d_model, requires_grad=True)
    targets = torch.randint(0, vocab, (positions,))

    def step() -> None:
        if chunk is None:
            logps = token_logps(head(hidden).unsqueeze(0), targets.unsqueeze(0)).squeeze(0)
        else:
            logps = chunked_token_logps(head, hidden, targets, chunk)
        logps.sum().backward()
        head.weight.grad = hidden.grad = None

    before = rss_mb()
    reset_peak_rss()
    step()  # memory from the first step: after it the allocator may keep freed pages, hiding later peaks
    head_mib = peak_rss_mb() - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"head_mib": head_mib, "seconds": times[len(times) // 2], "rss_before_mib": before}


def run_all(vocabs: list[int], d_model: int, positions: int, chunks: list[int | None], repeats: int) -> list[dict]:
    """One fresh ``python -m dpo_lightning.bench.chunked_head --one ...`` per (vocab, chunk)."""
    rows = []
    for vocab in vocabs:
        for chunk in chunks:
            args = [sys.executable, "-m", "dpo_lightning.bench.chunked_head", "--one", "--vocab", str(vocab)]
            args += ["--d-model", str(d_model), "--positions", str(positions), "--repeats", str(repeats)]
            args += ["--chunks", str(chunk) if chunk else "none"]
            out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
            rows.append({"vocab": vocab, "chunk": chunk, **json.loads(out.strip().splitlines()[-1])})
    return rows


def table(rows: list[dict], positions: int) -> str:
    """Markdown: per vocab, one-shot then each chunk size, with the fp32 logits' own size for scale."""
    lines = ["| vocab | chunk | head MiB (peak RSS above pre-head) | fwd+bwd s | x one-shot time | logits MiB |"]
    lines.append("|---|---|---|---|---|---|")
    base = {r["vocab"]: r["seconds"] for r in rows if r["chunk"] is None}
    for r in rows:
        logits = (r["chunk"] or positions) * r["vocab"] * 4 / 2**20
        ratio = r["seconds"] / base[r["vocab"]] if r["vocab"] in base else float("nan")
        lines.append(
            f"| {r['vocab']:,} | {r['chunk'] or 'one-shot'} | {r['head_mib']:.0f} | {r['seconds']:.2f} "
            f"| {ratio:.2f} | {logits:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[50257, 128256])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--chunks", nargs="+", default=["none", "256", "1024"], help="'none' is one-shot")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", action="store_true", help="measure one (vocab, chunk) here and print JSON")
    args = parser.parse_args(argv)
    chunks = [None if c == "none" else int(c) for c in args.chunks]
    if args.one:
        print(json.dumps(measure(args.vocab[0], args.d_model, args.positions, chunks[0], args.repeats)))
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d {args.d_model}, N {args.positions}")
    print(table(run_all(args.vocab, args.d_model, args.positions, chunks, args.repeats), args.positions))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
