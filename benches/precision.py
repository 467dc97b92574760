#!/usr/bin/env python3
"""Mixed precision: step time and peak RSS of f16 and bf16 against f32, side by side in one run.

    benches/precision.py [--threads N] [--rounds R] [--steps S]

For each model (the MLP and the CNN of examples/), each backend (ndarray: emulated half
precision; flex: native) and each precision, runs `allcores bench` (5 warm-up steps, then S
timed ones, one process): the median step time and the peak RSS. The precisions of a cell run in turn,
round after round, so that drift of a shared machine falls on all of them; the medians are
printed, with each half precision's ratio to f32. A last table repeats the memory comparison at
a large batch, where activations outweigh the weights.

Needs the release binary: cargo build --release
"""
import argparse, json, os, statistics, subprocess, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "allcores")
MODELS = {"mlp": "examples/mnist-mlp.toml", "cnn": "examples/mnist-cnn.toml"}
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
    for _ in range(rounds):
        for (model, backend, batch, steps) in cells:
            for precision in PRECISIONS:
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
        print(f"| {model} | {backend} | {batch} | {' | '.join(shown)} | "
              f"{median['f16'] / median['f32']:.2f}x | {median['bf16'] / median['f32']:.2f}x |")


def step(run):
    return run[0]


def rss(run):
    return run[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} is missing: run cargo build --release first")
    speed = [(m, b, 128, args.steps) for m in MODELS for b in ["ndarray", "flex"]]
    memory = [(m, b, batch, 6) for m, batch in [("mlp", 4096), ("cnn", 1024)]
              for b in ["ndarray", "flex"]]
    print(f"threads {args.threads}, {args.rounds} rounds, medians")
    table(f"Median step time, batch 128, {args.steps} timed steps", measure(speed, args.rounds, args.threads), step,
          lambda seconds: f"{seconds * 1e3:.2f} ms")
    table("Peak RSS at a large batch (6 timed steps)", measure(memory, args.rounds, args.threads), rss,
          lambda size: f"{size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
