"""The shape of the code: which package imports which, and how long each module is.

    python bench/imports.py            # the package graph, the module table, and the rules' verdict

Reads the source with ``ast`` (nothing is imported or run). A package may import the packages
below it in the layer order ``utils < model < configs < engines < main``; an import the other way
("an arrow up") is listed, as is a source file over :data:`MAX_LINES` lines. Exit status 1 when a
rule is broken, so the check can run in a test or CI.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The packages, lowest first: each may import only those before it (and itself).
LAYERS = ("utils", "model", "configs", "engines", "main")
MAX_LINES = 700


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every source module of the layered packages (and ``main.py``), by dotted name."""
    found = {"main": root / "main.py"}
    for package in LAYERS[:-1]:
        for path in sorted((root / package).rglob("*.py")):
            found[".".join(path.relative_to(root).with_suffix("").parts)] = path
    return found


def imported(path: Path) -> set[str]:
    """The dotted names ``path`` imports (absolute imports; at any depth, also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def package_of(name: str) -> str:
    return name.split(".")[0]


def graph(root: Path = ROOT) -> dict[tuple[str, str], list[str]]:
    """``{(from package, to package): ["module -> module", ...]}`` between different packages."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, path in modules(root).items():
        for target in sorted(imported(path)):
            src, dst = package_of(name), package_of(target)
            if dst in LAYERS and dst != src:
                edges[(src, dst)].append(f"{name} -> {target}")
    return dict(edges)


def arrows_up(edges: dict[tuple[str, str], list[str]]) -> list[str]:
    """The imports from a lower layer to a higher one."""
    return [link for (src, dst), links in edges.items() if LAYERS.index(dst) > LAYERS.index(src) for link in links]


def long_files(root: Path = ROOT) -> list[tuple[str, int]]:
    return [(n, c) for n, c in line_counts(root).items() if c > MAX_LINES]


def line_counts(root: Path = ROOT) -> dict[str, int]:
    return {name: len(path.read_text().splitlines()) for name, path in modules(root).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository to read (default: this one)")
    args = parser.parse_args(argv)
    edges = graph(args.root)
    print("| from | to | imports |\n|---|---|---|")
    for (src, dst), links in sorted(edges.items(), key=lambda e: (LAYERS.index(e[0][0]), LAYERS.index(e[0][1]))):
        print(f"| {src} | {dst} | {len(links)} |")
    counts = line_counts(args.root)
    print("\n| module | lines |\n|---|---|")
    for name, count in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {count} |")
    up, long = arrows_up(edges), long_files(args.root)
    print(f"\nlayers (each imports only those left of it): {' < '.join(LAYERS)}")
    print("arrows up: " + ("none" if not up else "\n  " + "\n  ".join(up)))
    print(f"files over {MAX_LINES} lines: " + ("none" if not long else ", ".join(f"{n} ({c})" for n, c in long)))
    return 1 if up or long else 0


if __name__ == "__main__":
    sys.exit(main())
