"""allcores against PyTorch, side by side: run by benches/vs_pytorch.sh (which finds a Python
with torch), not by hand.

For each model, batch and backend it runs, round by round, `allcores bench` (one thread count,
so one process) and then benches/torch_steps.py at each thread count in turn, so that the two
sides of a ratio meet the same machine load; with --rounds R, R such rounds: a cell's samples/s
are each side's median run, its ratio the median of the rounds' ratios (a shared machine's bad
second falls on one round, not on the figure), and each side's parallel efficiency the median
of the rounds' efficiencies, each round's run at n threads against the same round's run at the
smallest count (as `allcores bench --repeat` pairs them). Both train with Adam, lr 1e-3, f32,
on batches gathered from the shipped MNIST digits, and both time steady-state steps after a
warm-up.

Cells: MLP 784-512-512-10 at batch 128 and 256 and the CNN of examples/mnist-cnn.toml at batch
128, on backends ndarray and flex, at each thread count (PyTorch has no backend: it runs once
per cell, so its figure beside each backend is its own measurement).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = [  # (name, config, batch)
    ("mlp", "examples/mnist-mlp.toml", 128),
    ("mlp", "examples/mnist-mlp.toml", 256),
    ("cnn", "examples/mnist-cnn.toml", 128),
]
MODEL_NAMES = list(dict.fromkeys(name for name, _, _ in MODELS))  # ["mlp", "cnn"]
BACKENDS = ["ndarray", "flex"]


def name_list(known):
    """An argparse type: a comma-separated subset of `known`, in `known`'s order."""
    def parse(text):
        names = set(text.split(","))
        if not names <= set(known):
            raise argparse.ArgumentTypeError(f"{text!r}: give some of {','.join(known)}")
        return [k for k in known if k in names]
    return parse


def thread_list(text):
    try:
        threads = sorted({int(t) for t in text.split(",")})
    except ValueError:
        threads = []
    if not threads or threads[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give thread counts like 1,2,4")
    return threads


def run_json(command, env=None):
    """Runs `command`; returns the JSON object on its last stdout line."""
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def allcores(binary, config, batch, backend, threads, steps, warmup):
    sets = [
        f"training.batch_size={batch}",
        "training.accumulation_steps=1",
        f"training.backend={backend}",
        'optimizer.kind="adam"',
        "optimizer.lr=0.001",
        'optimizer.schedule="constant"',
    ]
    command = [binary, "bench", config, "--threads", str(threads), "--steps", str(steps),
               "--warmup", str(warmup), "--json"]
    for s in sets:
        command += ["--set", s]
    return run_json(command)["runs"][0]


def pytorch(model, batch, threads, steps, warmup):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, os.path.join(REPO, "benches", "torch_steps.py"), "--model", model,
               "--batch", str(batch), "--threads", str(threads), "--steps", str(steps),
               "--warmup", str(warmup)]
    return run_json(command, env)


def median_run(runs):
    """The run with the median samples/s (the upper middle one of an even count, as
    `allcores bench --repeat` takes it)."""
    ordered = sorted(runs, key=lambda r: r["samples_per_second"])
    return ordered[len(ordered) // 2]


def cpu_model():
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def efficiency(sps, threads, base_sps, base_threads):
    """Samples/s at `threads` over (threads / base_threads x samples/s at base_threads)."""
    return sps * base_threads / (threads * base_sps) if base_sps > 0 else 0.0


def summarize(model, batch, backend, threads, rounds, base, load):
    """One cell from the rounds (each a dict thread count -> (allcores run, PyTorch run)):
    each side's median run, the median of the rounds' ratios, and each side's efficiency as the
    median of the rounds' efficiencies, each round's run at `threads` against its own run at
    `base` threads."""
    ours = median_run([r[threads][0] for r in rounds])
    theirs = median_run([r[threads][1] for r in rounds])
    ratios = [o["samples_per_second"] / t["samples_per_second"]
              for o, t in (r[threads] for r in rounds)]
    sides = {}
    for side, i in (("allcores", 0), ("pytorch", 1)):
        sides[side] = [efficiency(r[threads][i]["samples_per_second"], threads,
                                  r[base][i]["samples_per_second"], base) for r in rounds]
    return {
        "model": model, "batch": batch, "backend": backend, "threads": threads,
        "allcores_sps": ours["samples_per_second"], "pytorch_sps": theirs["samples_per_second"],
        "ratio": statistics.median(ratios), "round_ratios": ratios,
        "allcores_efficiency": statistics.median(sides["allcores"]),
        "pytorch_efficiency": statistics.median(sides["pytorch"]),
        "allcores_round_efficiencies": sides["allcores"],
        "pytorch_round_efficiencies": sides["pytorch"],
        "allcores_step_ms_median": ours["step_ms_median"],
        "pytorch_step_ms_median": theirs["step_ms_median"],
        "allcores_cpu_utilization": ours["cpu_utilization"],
        "pytorch_cpu_utilization": theirs["cpu_utilization"],
        "allcores_weights_sha256": ours["weights_sha256"],
        "load_average_1min": load,
    }


def table(cells):
    head = ("| model | batch | backend | threads | allcores samples/s | PyTorch samples/s "
            "| allcores / PyTorch (median round) | allcores efficiency | PyTorch efficiency |")
    lines = [head, "|---|--:|---|--:|--:|--:|--:|--:|--:|"]
    for c in cells:
        lines.append(
            f"| {c['model']} | {c['batch']} | {c['backend']} | {c['threads']} "
            f"| {c['allcores_sps']:,.0f} | {c['pytorch_sps']:,.0f} | {c['ratio']:.2f}x "
            f"| {c['allcores_efficiency']:.0%} | {c['pytorch_efficiency']:.0%} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description="allcores / PyTorch samples/s, side by side.")
    parser.add_argument("--bin", default=os.path.join(REPO, "target", "release", "allcores"))
    parser.add_argument("--threads", type=thread_list,
                        default=thread_list(os.environ.get("BENCH_THREADS", "1,2")),
                        help="thread counts, e.g. 1,2,4,8,16 (default: $BENCH_THREADS or 1,2)")
    parser.add_argument("--models", type=name_list(MODEL_NAMES), default=MODEL_NAMES,
                        help="models to run, e.g. cnn (default: mlp,cnn)")
    parser.add_argument("--backends", type=name_list(BACKENDS), default=BACKENDS,
                        help="allcores backends to run, e.g. ndarray (default: ndarray,flex)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps a run (200)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (20)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each side per cell, alternating; medians (3)")
    parser.add_argument("--out", help="also write the cells and the machine as JSON here")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be at least 1, --warmup at least 0")

    import torch  # noqa: E402  (only its version; the runs import it in their own process)

    started = time.time()
    models = [m for m in MODELS if m[0] in args.models]
    total = len(models) * len(args.backends) * len(args.threads)
    print(f"allcores vs PyTorch {torch.__version__}: {total} cells x 2 x {args.rounds} runs, "
          f"{args.warmup} warm-up + {args.steps} timed steps each, threads "
          f"{','.join(map(str, args.threads))}, {os.cpu_count()} CPUs ({cpu_model()})", file=sys.stderr)
    cells, weights, done = [], [], 0
    base = args.threads[0]
    for model, config, batch in models:
        for backend in args.backends:
            load = os.getloadavg()[0]
            # One round runs every thread count, each side in turn, so that a round's runs at
            # n threads and at the smallest count are minutes closer than whole cells would be.
            rounds = []
            for r in range(args.rounds):
                rounds.append({t: (allcores(args.bin, config, batch, backend, t, args.steps,
                                            args.warmup),
                                   pytorch(model, batch, t, args.steps, args.warmup))
                               for t in args.threads})
                runs = " · ".join(f"{t}t {ours['samples_per_second']:,.0f} / "
                                  f"{theirs['samples_per_second']:,.0f}"
                                  for t, (ours, theirs) in rounds[-1].items())
                print(f"  {model} batch {batch} {backend}, round {r + 1}/{args.rounds}, "
                      f"allcores / PyTorch samples/s: {runs}", file=sys.stderr)
            hashes = {ours["weights_sha256"] for r in rounds for ours, _ in r.values()}
            weights.append((f"{model} {batch} {backend}", sorted(h[:12] for h in hashes)))
            for threads in args.threads:
                done += 1
                cell = summarize(model, batch, backend, threads, rounds, base, load)
                cells.append(cell)
                print(f"[{done}/{total}] {model} batch {batch} {backend} {threads} threads: "
                      f"allcores {cell['allcores_sps']:,.0f} · PyTorch "
                      f"{cell['pytorch_sps']:,.0f} samples/s · {cell['ratio']:.2f}x (rounds "
                      f"{min(cell['round_ratios']):.2f}x to {max(cell['round_ratios']):.2f}x); "
                      f"allcores efficiency {cell['allcores_efficiency']:.0%} (rounds "
                      f"{' '.join(f'{e:.0%}' for e in cell['allcores_round_efficiencies'])}); "
                      f"load average {load:.1f}",
                      file=sys.stderr)

    print(table(cells))
    print(f"\n{len(cells)} cells in {time.time() - started:.0f} s; samples/s: median of "
          f"{args.rounds} runs a side; ratio: median of the rounds' ratios; efficiency: median of "
          f"the rounds' samples/s at n threads / (n / {base} x samples/s at {base} in the same "
          "round), per model, batch and backend")
    loads = [c["load_average_1min"] for c in cells]
    print(f"1-minute load average before each model's rounds: {min(loads):.1f} to {max(loads):.1f} on "
          f"{os.cpu_count()} CPUs (above the thread count, other processes shared the cores)")
    # The promise, checked on every allcores run of the benchmark, not only the medians.
    runs = args.rounds * len(args.threads)
    if all(len(h) == 1 for _, h in weights):
        print(f"allcores weights: one hash in all {runs} runs of each model, batch and backend "
              f"(threads {','.join(map(str, args.threads))}): "
              + ", ".join(f"{name} {h[0]}" for name, h in weights))
    else:
        print("allcores weights DIFFER across runs of: "
              + ", ".join(f"{name} ({' '.join(h)})" for name, h in weights if len(h) > 1))
    if args.out:
        result = {
            "machine": {"cpus": os.cpu_count(), "processor": cpu_model(),
                        "platform": platform.platform()},
            "torch_version": torch.__version__,
            "warmup_steps": args.warmup, "timed_steps": args.steps, "threads": args.threads,
            "rounds": args.rounds,
            "cells": cells,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"results {args.out}")


if __name__ == "__main__":
    main()
