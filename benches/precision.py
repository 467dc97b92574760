#!/usr/bin/env python3
"""Mixed precision: step time and peak RSS of f16 and bf16 against f32, side by side in one run.

    benches/precision.py [--threads N] [--rounds R] [--steps S]

For each model (the MLP and the CNN of examples/), each backend (ndarray: emulated half
precision; flex: native) and each precision, runs `allcores bench` (5 warm-up steps, then S
timed ones, one process; S = 300 for the MLP and 60 for the CNN unless --steps is given): the
median step time and the peak RSS. The precisions of a cell run in turn, round after round, and
each half precision is compared with the f32 run of its own round, seconds before: a shared
machine's speed drifts over minutes, and a ratio of neighbours cancels most of the drift. The
tables give each precision's median over the rounds and the median of the per-round ratios, with
their range. A last table repeats the memory comparison at a large batch, where activations
outweigh the weights.

Needs the release binary: cargo build --release
"""
import argparse, json, os, statistics, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "allcores")
MODELS = {"mlp": "examples/mnist-mlp.toml", "cnn": "examples/mnist-cnn.toml"}
# Timed steps per process: about a second of steps each.
STEPS = {"mlp": 300, "cnn": 60}
PRECISIONS = ["f32", "f16", "bf16"]


def bench(config, backend, precision, batch, steps, threads):
    """(median step seconds, peak RSS bytes) of one `allcores bench` process."""
    command = [BIN, "bench", os.path.join(ROOT, config), "--threads", str(threads),
               "--steps", str(steps), "--warmup", "5", "--json",
               "--set", f"training.backend={backend}", "--set", f"training.precision={precision}",
               "--set", f"training.batch_size={batch}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)}: {done.stderr.strip()}")
    run = json.loads(done.stdout.strip().splitlines()[-1])["runs"][0]
    return run["step_ms_median"] / 1e3, run["peak_rss_bytes"]


def measure(cells, rounds, threads):
    """{(model, backend, batch): {precision: [(step seconds, rss), ...]}}"""
    results = {cell: {p: [] for p in PRECISIONS} for cell in cells}
    for r in range(rounds):
        for (model, backend, batch, steps) in cells:
            # Each round starts with another precision: no precision always runs first.
            for precision in PRECISIONS[r % 3:] + PRECISIONS[:r % 3]:
                results[(model, backend, batch, steps)][precision].append(
                    bench(MODELS[model], backend, precision, batch, steps, threads))
    return results


def table(title, results, column, show):
    print(f"\n{title}")
    print("| model | backend | batch | f32 | f16 | bf16 | f16/f32 | bf16/f32 |")
    print("|---|---|---|---|---|---|---|---|")
    for (model, backend, batch, _), runs in results.items():
        median = {p: statistics.median(column(run) for run in runs[p]) for p in PRECISIONS}
        shown = [show(median[p]) for p in PRECISIONS]
        ratios = [ratio(runs, half, column) for half in PRECISIONS[1:]]
        print(f"| {model} | {backend} | {batch} | {' | '.join(shown)} | {' | '.join(ratios)} |")


def ratio(runs, half, column):
    """The median of the rounds' half/f32 ratios, and their range."""
    each = [column(h) / column(f) for h, f in zip(runs[half], runs["f32"])]
    if len(each) == 1:
        return f"{each[0]:.2f}x"
    return f"{statistics.median(each):.2f}x ({min(each):.2f}-{max(each):.2f})"


def step(run):
    return run[0]


def rss(run):
    return run[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, help="timed steps of every run (default: 300 "
                        "for the MLP, 60 for the CNN)")
    args = parser.parse_args()
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} is missing: run cargo build --release first")
    speed = [(m, b, 128, args.steps or STEPS[m]) for m in MODELS for b in ["ndarray", "flex"]]
    memory = [(m, b, batch, 6) for m, batch in [("mlp", 4096), ("cnn", 1024)]
              for b in ["ndarray", "flex"]]
    print(f"threads {args.threads}, {args.rounds} rounds: medians, ratios to the f32 run of "
          "the same round (median, range)")
    table("Median step time, batch 128", measure(speed, args.rounds, args.threads), step,
          lambda seconds: f"{seconds * 1e3:.2f} ms")
    table("Peak RSS at a large batch (6 timed steps)", measure(memory, args.rounds, args.threads), rss,
          lambda size: f"{size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
