#!/usr/bin/env python3
"""Mutation run over the security- and correctness-critical modules (on demand, not in CI).

Each mutant is one small change to one line (a comparison flipped, a boolean operator
swapped, a constant nudged, a call dropped, a return emptied, a condition negated). It is
applied to a copy of the tree, the fast tests that guard that module run against the copy
(first failure stops them), and the mutant is *killed* if they fail, *survives* if they pass.
The score is killed / (killed + survived); survivors are listed with file, line and change:
each is either a missing test or an equivalent mutant. The working tree is never touched.

    .venv/bin/python scripts/mutate.py                      # every target, every mutant
    .venv/bin/python scripts/mutate.py --target policy --sample 20 --seed 1
    .venv/bin/python scripts/mutate.py --list               # the mutants, without running
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module group -> (source files, the fast tests that must notice a change in them)
TARGETS = {
    "crypto": (["cxr_mq/crypto/*.py"], ["tests/unit/test_crypto.py", "tests/unit/test_crypto_regressions.py",
                                        "tests/unit/test_threshold_codec.py", "tests/unit/test_threshold_committee.py"]),
    "policy": (["cxr_mq/policy.py", "cxr_mq/rounds.py"], ["tests/unit/test_policy.py", "tests/unit/test_aggregator.py"]),
    "aggregator": (["workers/aggregator.py", "workers/base.py"],
                   ["tests/unit/test_aggregator.py", "tests/unit/test_update_retention.py",
                    "tests/unit/test_aggregator_race.py"]),
    "transport": (["cxr_mq/transport/base.py", "cxr_mq/transport/embedded.py"],
                  ["tests/contract/test_broker_contract.py", "tests/unit/test_aggregator.py", "-k", "not rabbitmq"]),
}
TIMEOUT = 300  # seconds per mutant's test run; a hang counts as killed (tests must not hang)

_COMPARE_SWAPS = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt,
                  ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
                  ast.In: ast.NotIn, ast.NotIn: ast.In}
_BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult,
                ast.Mod: ast.FloorDiv, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd,
                ast.LShift: ast.RShift, ast.RShift: ast.LShift}


@dataclass
class Mutant:
    path: str
    line: int
    change: str
    index: int  # which mutation site of this kind in the file (for re-applying it)
    kind: str


def _sites(tree: ast.AST):
    """(node, kind, description) for every mutable spot, in a stable order."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE_SWAPS:
            new = _COMPARE_SWAPS[type(node.ops[0])]
            yield node, "compare", f"{type(node.ops[0]).__name__} -> {new.__name__}"
        elif isinstance(node, ast.BoolOp):
            yield node, "boolop", f"{type(node.op).__name__} -> {'Or' if isinstance(node.op, ast.And) else 'And'}"
        elif isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAPS:
            yield node, "binop", f"{type(node.op).__name__} -> {_BINOP_SWAPS[type(node.op)].__name__}"
        elif isinstance(node, ast.Constant) and type(node.value) is int and not isinstance(node.value, bool):
            yield node, "number", f"{node.value} -> {node.value + 1}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            yield node, "bool", f"{node.value} -> {not node.value}"
        elif isinstance(node, ast.If):
            yield node, "negate-if", "if c -> if not c"
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            yield node, "return-none", "return x -> return None"
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            yield node, "drop-call", "call dropped"


def _mutate(node: ast.AST, kind: str) -> None:
    if kind == "compare":
        node.ops = [_COMPARE_SWAPS[type(node.ops[0])]()]
    elif kind == "boolop":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif kind == "binop":
        node.op = _BINOP_SWAPS[type(node.op)]()
    elif kind == "number":
        node.value = node.value + 1
    elif kind == "bool":
        node.value = not node.value
    elif kind == "negate-if":
        node.test = ast.UnaryOp(op=ast.Not(), operand=node.test)
    elif kind == "return-none":
        node.value = ast.Constant(value=None)
    elif kind == "drop-call":
        node.value = ast.Constant(value=None)


def _inert_nodes(tree: ast.AST) -> set[int]:
    """Docstrings, annotations and f-strings (message text): mutants there change nothing
    a test should pin down."""
    skip = set()
    for node in ast.walk(tree):
        inert = [getattr(node, "annotation", None), getattr(node, "returns", None)]
        if isinstance(node, ast.JoinedStr):
            inert.append(node)
        for sub in filter(None, inert):
            skip.update(id(n) for n in ast.walk(sub))
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                skip.add(id(body[0].value))
    return skip


def _skippable(node: ast.AST, kind: str, source_lines: list[str]) -> bool:
    """Leave alone what only logs or only states a message (a mutant there says nothing)."""
    line = source_lines[node.lineno - 1]
    if "log." in line or "_log." in line or "logger" in line or "metrics." in line:
        return True
    if "crash.reached" in line:  # a fault-injection hook, inert unless CXR_MQ_FAULTS arms it
        return True
    if kind == "drop-call" and ("log" in line or "metrics" in line):
        return True
    return False


def mutants_of(rel_path: str, tree_root: Path = ROOT) -> list[Mutant]:
    source = (tree_root / rel_path).read_text()
    tree = ast.parse(source)
    lines = source.splitlines()
    skip = _inert_nodes(tree)
    found, counters = [], {}
    for node, kind, change in _sites(tree):
        index = counters.get(kind, 0)
        counters[kind] = index + 1
        if id(node) in skip or _skippable(node, kind, lines):
            continue
        found.append(Mutant(rel_path, node.lineno, change, index, kind))
    return found


def apply(mutant: Mutant, tree_root: Path) -> None:
    path = tree_root / mutant.path
    tree = ast.parse(path.read_text())  # the same sites, in the same order, as mutants_of
    seen = 0
    for node, kind, _ in _sites(tree):
        if kind != mutant.kind:
            continue
        if seen == mutant.index:
            _mutate(node, kind)
            break
        seen += 1
    path.write_text(ast.unparse(ast.fix_missing_locations(tree)) + "\n")


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.pyc", "reports", ".pytest_cache", "mutants")
    shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)


def run_tests(tree_root: Path, tests: list[str]) -> tuple[bool, float]:
    """True when the tests pass (the mutant survived)."""
    env = {**os.environ, "PYTHONPATH": str(tree_root), "TF_CPP_MIN_LOG_LEVEL": "3"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
           "--no-header", *tests]
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=tree_root, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        passed = proc.returncode == 0
    except subprocess.TimeoutExpired:
        passed = False
    return passed, time.monotonic() - started


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="module group (repeatable)")
    ap.add_argument("--sample", type=int, default=0, help="at most this many mutants per group (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="which sample")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    results, totals = [], {"killed": 0, "survived": 0}
    with tempfile.TemporaryDirectory(prefix="cxr-mq-mutate-") as tmp:
        work = Path(tmp) / "tree"
        if not args.list:
            _copy_tree(work)  # one snapshot: later edits to the working tree do not leak in
        source_root = ROOT if args.list else work
        for group in args.target or sorted(TARGETS):
            patterns, tests = TARGETS[group]
            files = sorted({str(p.relative_to(ROOT)) for pat in patterns for p in ROOT.glob(pat)
                            if p.name != "__init__.py"})
            mutants = [m for f in files for m in mutants_of(f, source_root)]
            if args.sample and len(mutants) > args.sample:
                mutants = sorted(random.Random(args.seed).sample(mutants, args.sample),
                                 key=lambda m: (m.path, m.line))
            if args.list:
                for m in mutants:
                    print(f"{group:10} {m.path}:{m.line}  {m.change}")
                continue
            pristine = {rel: (work / rel).read_bytes() for rel in files}
            passed, seconds = run_tests(work, tests)
            if not passed:
                print(f"{group}: the tests fail without any mutant; fix them first", file=sys.stderr)
                return 2
            print(f"{group}: {len(mutants)} mutants, baseline tests {seconds:.0f}s", flush=True)
            for m in mutants:
                for rel, data in pristine.items():  # the snapshot's sources for every mutant
                    (work / rel).write_bytes(data)
                apply(m, work)
                survived, seconds = run_tests(work, tests)
                verdict = "SURVIVED" if survived else "killed"
                totals["survived" if survived else "killed"] += 1
                results.append({**asdict(m), "group": group, "survived": survived, "seconds": round(seconds, 1)})
                print(f"  {verdict:8} {m.path}:{m.line}  {m.change}  ({seconds:.0f}s)", flush=True)
            for rel, data in pristine.items():
                (work / rel).write_bytes(data)
    if args.list:
        return 0
    done = totals["killed"] + totals["survived"]
    score = totals["killed"] / done if done else 0.0
    print(f"\nmutation score: {totals['killed']}/{done} killed = {score:.0%}")
    for r in results:
        if r["survived"]:
            print(f"  survived: {r['path']}:{r['line']}  {r['change']}")
    if args.json:
        args.json.write_text(json.dumps({"score": score, **totals, "mutants": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
