"""Training throughput of the reference attention-flow model in PyTorch (CPU).

Same model and step as `cargo bench -p fedflow-common --bench throughput`:
Embedding(100, 64) -> LSTM(64) -> Dropout(0.2) -> LSTM(64) -> Dropout(0.2) -> Linear(5)
(or GRU layers with `--encoder gru`), cross-entropy, AdamW (lr 2e-3, weight decay 0.01),
fixed-length sequences; `--batch` and `--seq` take lists, as the Rust bench's do.
Prints one JSON line per setting. Run through `bench/run.sh`, which installs PyTorch.
"""

import argparse
import json
import time

import torch
from torch import nn


class AttentionFlow(nn.Module):
    def __init__(self, encoder="lstm", vocab=100, embed=64, hidden=64, classes=5, dropout=0.2):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        # The RNN's inter-layer dropout + the dropout below = the reference design.
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[encoder]
        self.encoder = rnn(embed, hidden, num_layers=2, batch_first=True, dropout=dropout)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids):
        out, _ = self.encoder(self.embedding(ids))
        return self.head(self.dropout(out[:, -1, :]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", default="64")
    p.add_argument("--encoder", default="lstm", choices=["lstm", "gru"])
    p.add_argument("--seq", default="20,100")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    settings = [(int(b), int(s)) for b in a.batch.split(",") for s in a.seq.split(",")]
    for batch, seq in settings:
        model = AttentionFlow(a.encoder).to(a.device)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
        loss_fn = nn.CrossEntropyLoss()
        ids = torch.randint(2, 100, (a.steps, batch, seq), device=a.device)
        labels = torch.randint(0, 5, (a.steps, batch), device=a.device)
        model.train()
        # Warm-up step.
        loss_fn(model(ids[0]), labels[0]).backward()
        opt.zero_grad()
        start = time.perf_counter()
        for s in range(a.steps):
            opt.zero_grad()
            loss = loss_fn(model(ids[s]), labels[s])
            loss.backward()
            opt.step()
        if a.device != "cpu":
            torch.cuda.synchronize()
        secs = time.perf_counter() - start
        print(json.dumps({
            "impl": f"pytorch-{torch.__version__}",
            "device": a.device,
            "encoder": a.encoder,
            "batch": batch,
            "seq": seq,
            "steps": a.steps,
            "threads": a.threads,
            "samples_per_sec": round(a.steps * batch / secs, 1),
        }))


if __name__ == "__main__":
    main()
