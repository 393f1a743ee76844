#!/usr/bin/env python3
"""A/B one `tesela bench` command across source trees, interleaved, in one call.

    python3 scripts/ab_bench.py --tree new=. --tree old=/tmp/old --rounds 3 -- \\
        bench decode --model qwen3-0.6b --batch-sizes 1,32 --contexts 512

Runs the command once per tree per round, each run in its own process with the tree first on
PYTHONPATH, and reverses the order of the trees every other round (A B, B A, A B, ...), so a
machine whose speed drifts during the call (a GPU host's timings can move 10-20% between
processes) weighs on every tree alike. Before the rounds, `--warmup` untimed runs per tree
(default 1) absorb what a first process pays (on the H200 hosts it ran 10-30% slow, whichever
tree it was: kernel compilation into Triton's cache, a cold machine). Each run writes its JSON into its own folder; the numeric
leaves of the JSON whose path matches `--metric` are gathered per tree, and the table printed
last gives each tree's median over the rounds with its spread (min-max), and the ratio of its
median to the first tree's. Make an old tree with
`git archive REV tesela pyproject.toml | tar -x -C /tmp/old`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_METRIC = r"(latency_ms|tok_s|tokens_per_s|_ms$|_us$)"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str], list[tuple[str, str]]]:
    if "--" not in argv:
        raise SystemExit("usage: ab_bench.py --tree NAME=DIR ... [--rounds N] -- bench ...")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", required=True, help="NAME=DIR, twice or more")
    parser.add_argument("--rounds", type=int, default=3, help="runs per tree (default 3)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed runs per tree first (default 1)"
    )
    parser.add_argument("--metric", default=DEFAULT_METRIC, help="regex over the JSON leaf paths")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    args = parser.parse_args(argv[:cut])
    command = argv[cut + 1 :]
    if not command or command[0] != "bench":
        raise SystemExit(f"the command after -- must be a `tesela bench` one, got {command!r}")
    if "--output-dir" in command:
        raise SystemExit("leave --output-dir out: each run gets its own folder")
    trees = []
    for spec in args.tree:
        name, _, folder = spec.partition("=")
        if not name or not (Path(folder) / "tesela").is_dir():
            raise SystemExit(f"--tree {spec!r}: want NAME=DIR with DIR/tesela a source tree")
        trees.append((name, str(Path(folder).resolve())))
    if len(trees) < 2 or len({n for n, _ in trees}) != len(trees):
        raise SystemExit("give two or more --tree NAME=DIR with distinct names")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    if args.warmup < 0:
        raise SystemExit("--warmup must be 0 or more")
    return args, command, trees


def schedule(names: list[str], rounds: int, warmup: int = 0) -> list[tuple[int, str]]:
    """(round, tree) in run order: `warmup` untimed rounds first (round < 0), then the timed
    ones; the trees' order reverses every other round."""
    return [
        (r, name) for r in range(-warmup, rounds) for name in (names if r % 2 == 0 else names[::-1])
    ]


def numeric_leaves(value, path: str = "") -> dict[str, float]:
    """Every int/float leaf of a JSON value, by its /-joined path (booleans and None skipped)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return {path: float(value)} if ok else {}
    leaves: dict[str, float] = {}
    for key, item in items:
        leaves.update(numeric_leaves(item, f"{path}/{key}"))
    return leaves


def run_once(command: list[str], tree: str, output_dir: Path, timeout: float) -> dict[str, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tree, env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", "tesela.cli", *command, "--output-dir", str(output_dir)]
    done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise SystemExit(f"{' '.join(command)} failed in {tree} ({done.returncode}):\n{tail}")
    files = sorted(output_dir.glob("*.json"))
    if len(files) != 1:
        raise SystemExit(f"expected one JSON result in {output_dir}, found {len(files)}")
    return numeric_leaves(json.loads(files[0].read_text()))


def summarize(runs: dict[str, list[dict[str, float]]], metric: str) -> list[str]:
    """The table: per leaf matching `metric` (present in every run), each tree's median
    [min-max] over its runs and its median's ratio to the first tree's."""
    names = list(runs)
    pattern = re.compile(metric)
    common = set.intersection(*(set(leaves) for r in runs.values() for leaves in r))
    keys = sorted(k for k in common if pattern.search(k))
    header = " | ".join(f"{n} median [min-max]" for n in names)
    ratios = " | ".join(f"{n}/{names[0]}" for n in names[1:])
    lines = [f"| metric | {header} | {ratios} |", "|---" * (1 + 2 * len(names) - 1) + "|"]
    for key in keys:
        values = {n: [leaves[key] for leaves in runs[n]] for n in names}
        medians = {n: statistics.median(v) for n, v in values.items()}
        cells = [f"{medians[n]:.4g} [{min(values[n]):.4g}-{max(values[n]):.4g}]" for n in names]
        base = medians[names[0]]
        rel = [f"{medians[n] / base:.3f}" if base else "n/a" for n in names[1:]]
        lines.append(f"| {key} | " + " | ".join(cells + rel) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args, command, trees = parse_args(sys.argv[1:] if argv is None else argv)
    folders = dict(trees)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    with tempfile.TemporaryDirectory(prefix="ab-bench-") as scratch:
        for round_index, name in schedule(list(folders), args.rounds, args.warmup):
            output_dir = Path(scratch) / f"{name}-{round_index}"
            label = "warm-up" if round_index < 0 else f"round {round_index + 1}/{args.rounds}"
            print(f"{label}: {name}", file=sys.stderr, flush=True)
            leaves = run_once(command, folders[name], output_dir, args.timeout)
            if round_index >= 0:
                runs[name].append(leaves)
    print(
        f"A/B of `tesela {' '.join(command)}`, {args.rounds} interleaved rounds after "
        f"{args.warmup} untimed per tree"
    )
    print("\n".join(summarize(runs, args.metric)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
