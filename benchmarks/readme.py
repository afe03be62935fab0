"""The README's benchmark tables, generated from the results JSON (so they never drift from it).

    python benchmarks/readme.py            # rewrite the generated blocks of README.md
    python benchmarks/readme.py --check    # exit 1 if README.md differs from the results (a unit test runs this)

Each block sits between ``<!-- generated: NAME -->`` and ``<!-- end generated -->`` in README.md
and is rendered from ``benchmarks/results/NAME.json`` (with the command and commit that made it).
The prose around the blocks is written by hand and cites the blocks' figures.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def _source(meta: dict) -> str:
    dirty = ", uncommitted changes" if meta.get("dirty") else ""
    return (f"`{meta['command']}` (commit {meta['commit']}{dirty}, {meta['date']}; {meta['machine']}, "
            f"vLLM {meta['vllm']})")


def offline(res: dict) -> list[str]:
    """Greedy rows: tokens/s of no-spec, every method's ratio to it, hivis / eagle (when eagle
    ran), and τ of the drafting methods."""
    rows = [r for r in res["rows"] if not r.get("offline") and r["temperature"] == 0]
    cell = {(r["workload"], r["batch"], r["method"]): r for r in rows}
    ran = {r["method"] for r in rows}
    methods = [m for m in ("ngram", "eagle", "text", "hivis") if m in ran]
    taus = [m for m in ("eagle", "text", "hivis") if m in ran]
    vs_eagle = "eagle" in ran and "hivis" in ran
    out = ["| workload | batch | no-spec tok/s | " + " | ".join(methods) + (" | hivis / eagle" if vs_eagle else "")
           + f" | τ {' / '.join(taus)} |",
           "|---|---|---|" + "---|" * len(methods) + ("---|" if vs_eagle else "") + "---|"]
    for w in dict.fromkeys(r["workload"] for r in rows):
        for b in sorted({r["batch"] for r in rows if r["workload"] == w}):
            base = cell[(w, b, "no-spec")]
            tps = {m: statistics.median(cell[(w, b, m)]["tokens_per_s"]) for m in ["no-spec", *methods]}
            tau = " / ".join(f"{cell[(w, b, m)]['acceptance']['accepted_per_draft']:.2f}" for m in taus)
            line = (f"| {w} | {b} | {statistics.median(base['tokens_per_s']):.0f} | "
                    + " | ".join(f"{tps[m] / tps['no-spec']:.2f}x" for m in methods))
            if vs_eagle:
                ratio = tps["hivis"] / tps["eagle"]
                line += f" | {'**' if ratio >= 1 else ''}{ratio:.2f}x{'**' if ratio >= 1 else ''}"
            out.append(line + f" | {tau} |")
    return out + ["", "From " + _source(res["meta"]) + "."]


def step_parts(res: dict) -> list[str]:
    """The drafting step by part, both methods (medians of the repetitions)."""
    labels = {"propose": "drafting (propose)", "set_inputs_first_pass": "first-pass inputs",
              "_plan": "hivis plan", "_compact": "hivis compaction", "model": "drafter forwards",
              "attention": "drafter attention", "step": "whole engine step"}
    rows = res["rows"]
    out = ["| ms per step | " + " | ".join(r["method"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    for part, label in labels.items():
        ms = (statistics.median(r["ms_per_step"][part]) for r in rows)
        out.append(f"| {label} | " + " | ".join(f"{x:.2f}" for x in ms) + " |")
    m = res["meta"]
    return out + ["", f"Batch {m['batch']}, {m['n']} prompts, {m['reps']} alternating repetitions; from "
                  + _source(m) + "."]


def scaling(res: dict) -> list[str]:
    """hivis / eagle tokens/s and drafting ms per step as image tokens grow."""
    cell = {(r["image_tokens"], r["max_tokens"], r["method"]): r for r in res["rows"]}
    out = ["| image tokens | max tokens | eagle tok/s | hivis tok/s | hivis / eagle | draft ms/step eagle / hivis |",
           "|---|---|---|---|---|---|"]
    for n, mt in sorted({(k[0], k[1]) for k in cell}):
        e, h = cell[(n, mt, "eagle")], cell[(n, mt, "hivis")]
        te, th = statistics.median(e["tokens_per_s"]), statistics.median(h["tokens_per_s"])
        out.append(f"| {n} | {mt} | {te:.0f} | {th:.0f} | {th / te:.2f}x | "
                   f"{e['draft_ms_per_step']:.2f} / {h['draft_ms_per_step']:.2f} |")
    return out + ["", "From " + _source(res["meta"]) + "."]


RENDER = {"offline": offline, "offline-next": offline, "offline-qwen": offline,  # (the variant targets)
          "step_parts": step_parts, "scaling": scaling}


def render(text: str) -> str:
    def block(m: re.Match) -> str:
        name = m.group("name")
        if name not in RENDER:
            raise SystemExit(f"README block {name!r}: no renderer (known: {', '.join(RENDER)})")
        res = json.loads((RESULTS / f"{name}.json").read_text())
        return m.group(1) + "\n".join(RENDER[name](res)) + "\n" + m.group(4)

    return BLOCK.sub(block, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md is not what the results render")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    args = ap.parse_args(argv)
    path = Path(args.readme)
    text = path.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print(f"{path}: generated benchmark tables differ from benchmarks/results/*.json; "
                  "run `python benchmarks/readme.py`", file=sys.stderr)
            return 1
        return 0
    path.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
