"""Back-to-back runs of ``gpt`` on ``data=2,tensor=2,pipe=2`` with a busy process beside them: none may hang.

Each run is ``python -m jaxmp.train`` (8 simulated CPU devices, 1F1B, sequence parallelism on and off in
turn) in its own process with a time limit; a CPU-bound process runs beside all of them, as on a busy
machine. A run that passes its limit, or XLA's own abort of a stuck collective ("threads to join the
rendezvous"), counts as a hang. Writes ``no_hang.md``.

Run (about 8 minutes on 2 CPU cores)::

    .venv/bin/python experiments/no_hang.py --runs 20 --out experiments/results
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

RUN = [
    sys.executable, "-m", "jaxmp.train", "--cpu-devices", "8", "--mesh", "data=2,tensor=2,pipe=2", "--model", "gpt",
    "--dataset", "synthetic-text", "--seq-len", "32", "--width", "64", "--hidden", "256", "--heads", "4",
    "--depth", "4", "--microbatches", "4", "--batch-size", "32", "--steps", "30", "--no-report",
]  # fmt: skip


def burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--limit", type=float, default=180.0, help="seconds before a run counts as hung")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    busy = multiprocessing.Process(target=burn, args=(args.runs * args.limit,), daemon=True)
    busy.start()
    rows = []
    try:
        for i in range(args.runs):
            argv = RUN + (["--sequence-parallel"] if i % 2 else [])
            start = time.monotonic()
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=args.limit)
                hung = "rendezvous" in done.stderr
                outcome = "ok" if done.returncode == 0 else ("hang (XLA abort)" if hung else f"exit {done.returncode}")
            except subprocess.TimeoutExpired:
                outcome = f"hang (no end in {args.limit:.0f} s)"
            rows.append((i + 1, bool(i % 2), outcome, time.monotonic() - start))
            print(rows[-1], flush=True)
    finally:
        busy.terminate()
    hangs = sum(not outcome.startswith(("ok", "exit")) for _, _, outcome, _ in rows)
    lines = [
        f"{args.runs} back-to-back runs of `{' '.join(RUN[1:])}` (odd runs with `--sequence-parallel`), a CPU-bound "
        f"process beside them; hangs: **{hangs}**.",
        "",
        "| run | SP | outcome | seconds |",
        "|---|---|---|---|",
        *(f"| {i} | {'yes' if sp else 'no'} | {outcome} | {seconds:.1f} |" for i, sp, outcome, seconds in rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "no_hang.md").write_text(text)


if __name__ == "__main__":
    main()
