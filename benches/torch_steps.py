"""PyTorch's side of benches/vs_pytorch.sh: steady-state training steps of allcores' built-in
models on the shipped MNIST digits, timed like `allcores bench` times its steps.

    python benches/torch_steps.py --model mlp|cnn --batch B --threads T [--steps N] [--warmup W]

Each step gathers its batch from a seeded per-epoch shuffle of the 7,000 training digits
(pixels scaled to [0, 1]), then forward, cross-entropy, backward and an Adam step (lr 1e-3,
f32). The first W steps are not timed. Prints one JSON object on one line.
"""

import argparse
import gzip
import json
import os
import statistics
import struct
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(REPO, "datasets", "mnist8k-train-images-idx3-ubyte.gz")
LABELS = os.path.join(REPO, "datasets", "mnist8k-train-labels-idx1-ubyte.gz")


def read_idx(path, magic):
    """The payload of a gzip IDX file, after checking its magic number."""
    data = gzip.open(path).read()
    found, count = struct.unpack(">II", data[:8])
    if found != magic:
        raise SystemExit(f"{path}: IDX magic {found:#x}, expected {magic:#x}")
    dims = 1 if magic == 0x801 else 3
    return count, data[4 + 4 * dims:]


def load_mnist():
    count, pixels = read_idx(IMAGES, 0x803)
    _, labels = read_idx(LABELS, 0x801)
    x = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).float().div_(255.0)
    y = torch.frombuffer(bytearray(labels), dtype=torch.uint8).long()
    return x.view(count, 784), y


class Mlp(nn.Module):
    """784-512-512-10, ReLU: allcores' `model.kind = "mlp"` with `hidden = [512, 512]`."""

    def __init__(self):
        super().__init__()
        self.hidden1 = nn.Linear(784, 512)
        self.hidden2 = nn.Linear(512, 512)
        self.out = nn.Linear(512, 10)

    def forward(self, x):
        return self.out(F.relu(self.hidden2(F.relu(self.hidden1(x)))))


class Cnn(nn.Module):
    """conv(1->32, 3x3)-ReLU-pool-conv(32->64, 3x3)-ReLU-pool-dense(128)-10: examples/mnist-cnn.toml."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.dense = nn.Linear(64 * 5 * 5, 128)
        self.out = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x.view(-1, 1, 28, 28))), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.out(F.relu(self.dense(x.flatten(1))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "cnn"], required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.batch < 1 or args.threads < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("batch, threads and steps must be at least 1, warmup at least 0")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_all, y_all = load_mnist()
    model = Cnn() if args.model == "cnn" else Mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(args.seed)

    order, position = torch.randperm(len(x_all), generator=generator), 0
    wall_ms, cpu_seconds, samples = [], 0.0, 0
    for step in range(args.warmup + args.steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        if position >= len(order):
            order, position = torch.randperm(len(x_all), generator=generator), 0
        index = order[position:position + args.batch]
        position += args.batch
        x, y = x_all.index_select(0, index), y_all.index_select(0, index)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if step >= args.warmup:
            wall_ms.append((time.perf_counter() - started) * 1e3)
            cpu_seconds += time.process_time() - cpu_started
            samples += len(index)

    seconds = sum(wall_ms) / 1e3
    print(json.dumps({
        "framework": "pytorch",
        "torch_version": torch.__version__,
        "model": args.model,
        "batch_size": args.batch,
        "threads": args.threads,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "samples": samples,
        "samples_per_second": samples / seconds,
        "step_ms_median": statistics.median(wall_ms),
        "cpu_utilization": cpu_seconds / (seconds * args.threads),
        "final_loss": loss.item(),
    }))


if __name__ == "__main__":
    main()
