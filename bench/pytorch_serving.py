"""Prediction speed of the reference attention-flow model in PyTorch (CPU, eval mode).

The PyTorch side of `cargo bench -p fedflow-client --bench serving`: the same default model
(Embedding(vocab, 64) -> LSTM(64) x 2 -> Linear(5)) in eval mode under
`torch.inference_mode()` (no autograd, no dropout), softmax probabilities as the agent
answers. Batch throughput: batches of 256 sessions, 20 timed after 2 warm-up; single-session
latency: 2,000 calls timed after 100 warm-up (the model alone: no HTTP, unlike the agent's
single-session figure). Prints one JSON line per length. Run through `bench/run.sh serving`.
"""

import argparse
import json
import statistics
import time

import torch

from pytorch_throughput import AttentionFlow


def percentile(sorted_ms, p):
    return sorted_ms[round((len(sorted_ms) - 1) * p)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", default="20,100")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=100)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    model = AttentionFlow(vocab=a.vocab).eval()
    for seq in [int(s) for s in a.seq.split(",")]:
        batch = torch.randint(2, a.vocab, (256, seq))
        one = torch.randint(2, a.vocab, (1, seq))
        with torch.inference_mode():
            for _ in range(2):
                torch.softmax(model(batch), dim=-1)
            start = time.perf_counter()
            for _ in range(20):
                torch.softmax(model(batch), dim=-1).tolist()
            rate = 20 * 256 / (time.perf_counter() - start)
            for _ in range(100):
                torch.softmax(model(one), dim=-1).tolist()
            lat = []
            for _ in range(2000):
                t = time.perf_counter()
                torch.softmax(model(one), dim=-1).tolist()
                lat.append((time.perf_counter() - t) * 1e3)
        lat.sort()
        print(json.dumps({
            "impl": f"pytorch-{torch.__version__}",
            "mode": "eval, inference_mode",
            "seq": seq,
            "threads": a.threads,
            "batch_sessions_per_sec": round(rate, 1),
            "single_p50_ms": round(percentile(lat, 0.5), 3),
            "single_p99_ms": round(percentile(lat, 0.99), 3),
            "single_mean_ms": round(statistics.fmean(lat), 3),
        }))


if __name__ == "__main__":
    main()
