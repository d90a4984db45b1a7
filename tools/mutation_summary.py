"""Per-module summary of a mutmut run (make mutation; docs/mutation.md).

Reads mutmut's result files (mutants/gatesim/**/*.py.meta) and the equivalent mutants listed
in docs/mutation.md (lines "- `gatesim.MODULE.x_function__mutmut_N`: reason"), and prints a
markdown table: per module the mutants, killed (timeouts included), survived, no tests,
equivalent (survivors listed as such), not run yet, and the kill rate: killed over killed +
survived + no tests (the mutants that ran, less the equivalent ones). --survivors lists the survivors not triaged yet.
"""
import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["claims", "executor", "optim", "sim", "metrics", "tracking", "diff"]
KILLED = {1: "killed", 3: "killed", 36: "timeout", 24: "timeout", -24: "timeout",
          152: "timeout", 255: "timeout"}


def status(code):
    if code is None:
        return "not run"
    if code in KILLED:
        return "killed"
    if code == 0:
        return "survived"
    if code in (5, 33):
        return "no tests"
    if code == 34:
        return "skipped"
    return "suspicious"        # segfaults, interrupted runs: rerun them


def equivalent_names(doc=ROOT / "docs" / "mutation.md"):
    if not doc.exists():
        return set()
    return set(re.findall(r"^- `(gatesim\.[\w.ǁ]+__mutmut_\d+)`", doc.read_text("utf-8"), re.M))


def results(mutants=ROOT / "mutants"):
    out = {}
    for meta in sorted((mutants / "gatesim").rglob("*.py.meta")):
        data = json.loads(meta.read_text("utf-8"))
        out.update(data.get("exit_code_by_key", {}))
    return out


def module_of(name):
    parts = name.split(".")
    return parts[1] if parts[1] in MODULES else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--survivors", action="store_true",
                    help="list the surviving mutants that docs/mutation.md does not list")
    ap.add_argument("--sample", type=int, metavar="N",
                    help="print N mutant names per module, drawn at random (--seed), for "
                         "make mutation MUTANTS=... (a full run takes days on 2 cores)")
    ap.add_argument("--seed", type=int, default=23)
    args = ap.parse_args(argv)
    res = results()
    if args.sample:
        import random
        rng = random.Random(args.seed)
        for mod in MODULES:
            names = sorted(n for n in res if module_of(n) == mod)
            print("\n".join(sorted(rng.sample(names, min(args.sample, len(names))))))
        return
    if not res:
        sys.exit("no mutmut results in mutants/: run make mutation first")
    equiv = equivalent_names()
    table = {m: Counter() for m in MODULES}
    open_survivors = []
    for name, code in sorted(res.items()):
        mod = module_of(name)
        if mod is None:
            continue
        st = status(code)
        if st == "survived" and name in equiv:
            st = "equivalent"
        elif st == "survived":
            open_survivors.append(name)
        table[mod]["mutants"] += 1
        table[mod][st] += 1
    if args.survivors:
        print("\n".join(open_survivors))
        return
    cols = ["mutants", "killed", "survived", "no tests", "equivalent", "suspicious", "not run"]
    print("| module | " + " | ".join(cols) + " | kill rate |")
    print("|---" * (len(cols) + 2) + "|")
    total = Counter()
    for mod in MODULES + ["all"]:
        c = total if mod == "all" else table[mod]
        if mod != "all":
            total.update(c)
        ran = c["killed"] + c["survived"] + c["no tests"]
        rate = f"{100 * c['killed'] / ran:.1f}%" if ran else "-"
        print(f"| {mod} | " + " | ".join(str(c[k]) for k in cols) + f" | {rate} |")


if __name__ == "__main__":
    main()
