"""allcores against PyTorch on the character-level GPT, side by side: run by
benches/vs_pytorch_gpt.sh (which finds a Python with torch), not by hand.

Round by round, at each thread count: `allcores bench examples/shakespeare-gpt.toml` (one
process) and then PyTorch's reference, ../shared/bench/torch_gpt.py (nanoGPT's model and CPU
recipe on the same text), so that both sides of a ratio meet the same machine load. Each side
trains batch 12 x context 64 in f32 and times steady-state steps only (allcores: after its
warm-up steps; PyTorch: after its first 10 iterations, evaluations excluded). With --rounds R,
a cell's tokens/s is each side's median run and its ratio the median of the rounds' ratios.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "examples/shakespeare-gpt.toml"
TEXT = "datasets/shakespeare8.txt.gz"


def run_json(command):
    """Runs `command`; returns the JSON object on its last stdout line."""
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def allcores(binary, threads, steps, warmup, backend, precision):
    command = [binary, "bench", CONFIG, "--threads", str(threads), "--steps", str(steps),
               "--warmup", str(warmup), "--json", "--set", f"training.backend={backend}",
               "--set", f"training.precision={precision}"]
    return run_json(command)["runs"][0]["tokens_per_second"]


def pytorch(python, script, threads, steps, precision):
    command = [python, script, TEXT, str(threads), "--iters", str(steps + 10),
               "--eval-every", str(10 * steps), "--eval-iters", "1"]
    if precision == "bf16":
        command.append("--bf16")
    return run_json(command)["tokens_per_second"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", required=True)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--torch-gpt", default=os.path.join(REPO, "..", "shared", "bench", "torch_gpt.py"))
    p.add_argument("--threads", default="1,2")
    p.add_argument("--backends", default="ndarray")
    p.add_argument("--precision", default="f32")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    a = p.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    backends = a.backends.split(",")
    cells = {}
    for r in range(1, a.rounds + 1):
        for t in threads:
            theirs = pytorch(a.python, a.torch_gpt, t, a.steps, a.precision)
            for b in backends:
                ours = allcores(a.bin, t, a.steps, a.warmup, b, a.precision)
                cell = cells.setdefault((b, t), {"ours": [], "theirs": [], "ratios": []})
                cell["ours"].append(ours)
                cell["theirs"].append(theirs)
                cell["ratios"].append(ours / theirs)
                print(f"round {r}/{a.rounds} threads {t} {b}: allcores {ours:,.0f} tokens/s, "
                      f"PyTorch {theirs:,.0f} ({ours / theirs:.2f}x)", file=sys.stderr, flush=True)
    print(f"| backend | threads | allcores tokens/s | PyTorch tokens/s | ratio (median of {a.rounds} rounds) |")
    print("|:--|--:|--:|--:|--:|")
    rows = []
    for (b, t), cell in sorted(cells.items()):
        row = {"backend": b, "threads": t, "precision": a.precision,
               "allcores_tokens_per_second": statistics.median(cell["ours"]),
               "pytorch_tokens_per_second": statistics.median(cell["theirs"]),
               "ratio": statistics.median(cell["ratios"]), "rounds": cell}
        rows.append(row)
        print(f"| {b} | {t} | {row['allcores_tokens_per_second']:,.0f} | "
              f"{row['pytorch_tokens_per_second']:,.0f} | {row['ratio']:.2f}x |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
