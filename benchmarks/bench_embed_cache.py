"""`elodin embed` start-up: numba compilation with and without Elodin's on-disk numba cache.

A store of ``--rows`` synthetic 1280-feature fingerprints (default 1398, the size of the
report that found the problem) is generated and reduced once; then ``elodin embed`` runs in
fresh processes, each timed whole (interpreter start and imports included), in wall time
and in CPU time (user + system of the child: on a shared, loaded machine the wall time
follows the load, the CPU time much less):

- before: numba as umap-learn and pynndescent configure it (only the functions they declare
  ``cache=True`` are cached, beside the installed packages), run twice;
- after: Elodin's cache (``pipeline.numba_cache``) in a fresh ``cache-dir``: the first call
  fills it, the second reuses it.

    .venv/bin/python benchmarks/bench_embed_cache.py [--rows 1398] [--work /tmp/elodin-bench-embed]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# The old behaviour: Elodin's numba cache switched off inside the child process.
BEFORE = (
    "import sys; from pipeline import numba_cache;"
    "numba_cache.configure = lambda: None; numba_cache.enable = lambda *a, **k: 0;"
    "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
)
AFTER = "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"


def run_embed(code: str, store: Path, env: dict) -> tuple[float, float]:
    """Wall time and CPU time (user + system) of one ``elodin embed`` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code, "embed", str(store)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1398)
    p.add_argument("--work", type=Path, default=Path("/tmp/elodin-bench-embed"))
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    from bench_analysis import generate

    from pipeline import analysis

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    store = args.work / "s.zarr"
    generate(store, args.rows, tile=200)
    analysis.reduce(str(store), components=20)

    base = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    base["PYTHONPATH"] = str(ROOT)
    before = [run_embed(BEFORE, store, base) for _ in range(2)]
    cache = args.work / "cache"
    env = {**base, "ELODIN__CACHE_DIR": str(cache)}
    after = [run_embed(AFTER, store, env) for _ in range(2)]
    index = sorted((cache / "numba").rglob("*.nbi"))
    print(f"elodin embed on {args.rows} rows, one process each: wall s / CPU s (user + system)")
    print(f"  load average at the end: {os.getloadavg()[0]:.1f} (wall times follow the load)")
    for name, runs in (("before (package caches only)", before), ("after (Elodin's cache)", after)):
        (w1, c1), (w2, c2) = runs
        print(f"  {name:<30} call 1 {w1:6.1f} / {c1:5.1f}   call 2 {w2:6.1f} / {c2:5.1f}")
    wall, cpu = after[1][0] / before[1][0], after[1][1] / before[1][1]
    print(f"  second call, after / before: wall {wall:.2f}, CPU {cpu:.2f}")
    print(f"  {len(index)} functions cached under {cache / 'numba'}")


if __name__ == "__main__":
    main()
