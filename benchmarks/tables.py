"""Regenerate every generated table of README.md and docs/*.md from the committed reports.

    python benchmarks/tables.py --collect runs/catalogue   # copy finished runs into docs/reports/
    python benchmarks/tables.py --collect runs/bench       # copy binq bench --json files too
    python benchmarks/tables.py                            # rewrite every section from docs/reports/
    python benchmarks/tables.py --check                    # exit 1 if a committed section is stale
    python benchmarks/tables.py --list                     # the sections, their docs and their runs

``--collect DIR`` takes ``DIR/<slug>/report.json`` of each catalogue run (``binq.runs``) made with the
catalogue's command and the quick protocol, and ``DIR/<name>.json`` files of ``binq bench`` records;
``--quiet-machine`` records that those runs had the machine to themselves. The tables never read
``runs/``: only ``docs/reports/`` (see docs/reports/README.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from binq.tables import SECTIONS, collect, regenerate, stale_sections

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--collect", nargs="+", type=Path, default=[], metavar="DIR", help="copy finished runs first")
    parser.add_argument("--quiet-machine", action="store_true", help="the collected runs had the machine to themselves")
    parser.add_argument("--check", action="store_true", help="only say which sections are stale (exit 1 if any)")
    parser.add_argument("--list", action="store_true", help="list the sections")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.list:
        for section in SECTIONS:
            print(f"{section.doc}#{section.name}: {', '.join(section.labels) or 'bench files'}")
        return 0
    for folder in args.collect:
        if not folder.is_dir():
            parser.error(f"--collect: {folder} is not a folder")
        for message in collect(folder, args.root, args.quiet_machine):
            print(message)
    if args.collect:
        return 0
    if args.check:
        stale = stale_sections(args.root)
        for name in stale:
            print(f"stale: {name}")
        return 1 if stale else 0
    changed = regenerate(args.root)
    print(f"{len(SECTIONS)} sections regenerated; changed: {', '.join(changed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
