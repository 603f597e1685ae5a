"""Find where a binq command reaches its peak resident memory: the Python stack at each new high.

    python benchmarks/memtrace.py [--every-mb 16] [--out trace.json] -- quantize --model ... --out ...

The command after ``--`` runs in this process (``binq.cli.main``). A sampler thread reads the resident
set from ``/proc/self/statm`` every millisecond; whenever it passes the previous high by ``--every-mb``
it records the main thread's stack at that moment (the binq frames, innermost last). The highs are
printed at the end, the last one being the peak. A sample can lag the allocation by a millisecond, so
the stack is where the program was just after memory grew: read the innermost frames as "at or just
after". A development tool for hunting memory, not a benchmark: use ``benchmarks/scale.py run`` for
numbers that go in the docs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def main_stack(main_id: int) -> list[str]:
    frame = sys._current_frames().get(main_id)
    if frame is None:
        return []
    lines = []
    for entry in traceback.extract_stack(frame):
        if "/binq/" in entry.filename or "/benchmarks/" in entry.filename:
            short = entry.filename.split("/binq/")[-1]
            lines.append(f"{short}:{entry.lineno} {entry.name}: {(entry.line or '').strip()[:90]}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every-mb", type=float, default=16.0)
    parser.add_argument("--out", default=None, help="write the highs as JSON here too")
    parser.add_argument("--top", type=int, default=12, help="print this many of the last highs")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    step = int(args.every_mb * 2**20)
    main_id = threading.main_thread().ident
    highs: list[dict] = []
    done = threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        high = recorded = 0
        while not done.is_set():
            rss = resident_bytes()
            if rss > recorded + step:
                high = recorded = rss
                highs.append({"t": round(time.perf_counter() - start, 3), "mib": round(rss / 2**20, 1),
                              "stack": main_stack(main_id)})  # fmt: skip
            elif rss > high:
                high = rss
                if highs:
                    highs[-1]["peak_mib"] = round(rss / 2**20, 1)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    from binq.cli import main as binq_main

    try:
        code = binq_main(command)
    finally:
        done.set()
        sampler.join()
    for high in highs[-args.top :]:
        print(f"--- {high['mib']:.0f} MiB (rising to {high.get('peak_mib', high['mib']):.0f}) at {high['t']} s")
        for line in high["stack"][-8:]:
            print("    " + line)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(highs, handle, indent=1)
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
