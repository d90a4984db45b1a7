"""Per-module summary of a mutmut run (make mutation; docs/mutation.md).

Reads mutmut's result files (mutants/gatesim/**/*.py.meta) and the equivalent mutants listed
in docs/mutation.md (the list under "**Equivalent**": lines
"- `gatesim.MODULE.x_function__mutmut_N`: reason"), and prints a
markdown table: per module the mutants, killed (timeouts included), survived, no tests,
equivalent (listed as such; one that timed out on a loaded machine too), not run yet, and the kill rate: killed over killed +
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
    text = doc.read_text("utf-8")
    # only the list under "**Equivalent**", up to the next bold heading
    m = re.search(r"^\*\*Equivalent\*\*.*?$(.*?)(?=^\*\*|\Z)", text, re.M | re.S)
    part = m.group(1) if m else ""
    return set(re.findall(r"^- `(gatesim\.[\w.ǁ]+__mutmut_\d+)`", part, re.M))


def results(mutants=ROOT / "mutants"):
    """{mutant name: exit code, None where not run yet}."""
    out = {}
    for meta in sorted((mutants / "gatesim").rglob("*.py.meta")):
        data = json.loads(meta.read_text("utf-8"))
        out.update(data.get("exit_code_by_key", {}))
    return out


def estimates(mutants=ROOT / "mutants"):
    """{mangled function name: seconds}: the clean time of the tests that cover it (mutmut's
    stats run), what a surviving mutant of the function costs before the scale below."""
    path = mutants / "mutmut-stats.json"
    if not path.exists():
        return {}
    stats = json.loads(path.read_text("utf-8"))
    dur = stats.get("duration_by_test", {})
    per_fn = {fn: sum(dur.get(t, 0.0) for t in tests)
              for fn, tests in stats.get("tests_by_mangled_function_name", {}).items()}
    return _PerMutant(per_fn)


class _PerMutant(dict):
    def get(self, name, default=None):
        return super().get(name.rsplit("__mutmut_", 1)[0], default)


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
    ap.add_argument("--jobs", type=int, default=2,
                    help="mutants run at a time, for the full-run estimate (default 2)")
    ap.add_argument("--wall", type=float, metavar="SECONDS",
                    help="wall time that the mutants run so far took (mutmut's 'Running "
                         "mutation testing' phase, summed over runs): with it, the table "
                         "extrapolates the time of a full run")
    args = ap.parse_args(argv)
    res = results()
    est = estimates()
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
    secs = {m: [] for m in MODULES}
    open_survivors = []
    for name, code in sorted(res.items()):
        mod = module_of(name)
        if mod is None:
            continue
        st = status(code)
        if name in equiv and st in ("survived", "killed"):
            st = "equivalent"     # a listed one is equivalent even if it timed out here
        elif st == "survived":
            open_survivors.append(name)
        table[mod]["mutants"] += 1
        table[mod][st] += 1
        secs[mod].append((est.get(name, 0.0), st in ("killed", "survived", "equivalent")))
    if args.survivors:
        print("\n".join(open_survivors))
        return
    cols = ["mutants", "killed", "survived", "no tests", "equivalent", "suspicious", "not run"]
    # Full-run time: each mutant's clean test time (the stats run's durations of the tests
    # that cover its function) scaled by what the mutants run so far really took.
    ran_est = sum(e for m in MODULES for e, ran in secs[m] if ran)
    scale = args.wall * args.jobs / ran_est if args.wall and ran_est else None
    print("| module | " + " | ".join(cols) + " | kill rate | test s per mutant | full run, h |")
    print("|---" * (len(cols) + 4) + "|")
    total, total_h = Counter(), 0.0
    for mod in MODULES + ["all"]:
        c = total if mod == "all" else table[mod]
        if mod != "all":
            total.update(c)
        ran = c["killed"] + c["survived"] + c["no tests"] + c["equivalent"]
        rate = (f"{100 * c['killed'] / (ran - c['equivalent']):.1f}%"
                if ran > c["equivalent"] else "-")
        if mod == "all":
            mean, hours = "", f"{total_h:.1f}" if scale else "-"
        else:
            e = [x for x, _ in secs[mod]]
            mean = f"{sum(e) / len(e):.1f}" if e else "-"
            h = scale * sum(e) / args.jobs / 3600 if scale else None
            total_h += h or 0.0
            hours = f"{h:.1f}" if h is not None else "-"
        print(f"| {mod} | " + " | ".join(str(c[k]) for k in cols) +
              f" | {rate} | {mean} | {hours} |")
    if scale:
        print(f"\nscale: the mutants run took {scale:.2f} x their clean test time")

if __name__ == "__main__":
    main()
