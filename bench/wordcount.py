"""Issue 4: word count, hand-written aiokafka loop vs headrace, same broker, one run.

    python bench/wordcount.py [--lines 100000] [--runs 3] [--bootstrap HOST:PORT]

Two comparisons, systems alternating run by run:

lines  (the examples.wordcount job shape) -- input: text lines (~9 words each, wordfreq
       frequencies), unkeyed, 4 partitions. plain: one process, split + dict count + produce
       (word, count) per word, no durability. headrace: flat_map split -> key_by(word) (a hop
       through the repartition topic) -> count -> sink, at_least_once and exactly_once,
       memory backend. headrace does strictly more work here: every word crosses Kafka twice.
keyed  (the fair single-stage variant) -- input: one record per word, key = word. plain: dict
       count + produce. headrace: source keyed by word -> count -> sink (no key_by).

Records/s counts output records (= words); CPU is seconds per million words.
Targets: headrace at_least_once >= 60 % of the plain loop, exactly_once >= 45 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import harness as h

SYSTEMS = ["plain", "headrace-alo", "headrace-eos"]


def cmd_for(system: str, mode: str, bootstrap: str, inp: str, out: str, tag: str) -> list[str]:
    io = {"bootstrap": bootstrap, "input": inp, "output": out, "mode": mode}
    if system == "plain":
        return h.system_argv(h.PROJECT_PY, "plain.py", **io, group=tag)
    guarantee = "at_least_once" if system.endswith("alo") else "exactly_once"
    return h.system_argv(
        h.PROJECT_PY, "headrace_count.py", **io, job=tag, guarantee=guarantee, backend="memory"
    )


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    from examples.corpus import count_words, generate_lines

    lines = generate_lines(args.lines)
    expected: Counter[str] = count_words(lines)
    words = [w for line in lines for w in line.lower().split()]
    results: dict[str, Any] = {"input_lines": len(lines), "input_words": len(words)}
    with h.Broker(args.bootstrap) as broker:
        bs = broker.bootstrap
        results["machine"] = h.machine_info(bs)
        nonce = secrets.token_hex(3)
        inputs = {"lines": f"bench.wc.lines.{nonce}", "keyed": f"bench.wc.words.{nonce}"}
        await h.create_topics(bs, list(inputs.values()))
        await h.produce(bs, inputs["lines"], [(None, line.encode()) for line in lines])
        await h.produce(bs, inputs["keyed"], [(w.encode(), h.pad_value(w, 0)) for w in words])
        for mode in ("lines", "keyed"):
            runs: dict[str, list[h.RunResult]] = {s: [] for s in SYSTEMS}
            for run in range(args.runs):
                for system in SYSTEMS:
                    tag = f"wc-{mode}-{system}-r{run}-{nonce}"
                    out = f"{tag}.out"
                    await h.create_topics(bs, [out])
                    m, _ = await h.run_system(
                        cmd_for(system, mode, bs, inputs[mode], out, tag),
                        bootstrap=bs,
                        output=out,
                        expected_outputs=len(words),
                        limit_s=args.timeout,
                        log_path=h.RUN_DIR / "logs" / f"{tag}.log",
                    )
                    r = h.RunResult(system, f"wordcount-{mode}", run)
                    if m.get("complete"):
                        r.records_per_s, r.cpu_s_per_m = m["records_per_s"], m["cpu_s_per_m"]
                        r.records, r.seconds = m["records"], m["seconds"]
                        iso = "read_committed" if system.endswith("eos") else "read_uncommitted"
                        r.correct, r.error = await h.verify_counts(
                            bs, out, expected, "int64", isolation=iso
                        )
                    else:
                        r.correct, r.error = False, m.get("error", "incomplete")
                    r.peak_rss_mb = m.get("peak_rss_mb")
                    print(
                        f"[wordcount {mode}] run {run} {system:14s} "
                        f"{r.records_per_s:10,.0f} words/s {r.cpu_s_per_m:6.1f} cpu-s/M "
                        f"correct={r.correct} {r.error}",
                        flush=True,
                    )
                    runs[system].append(r)
                    topics = [t for t in await h.list_topics(bs) if tag in t]
                    await h.delete_topics(bs, topics)
            summary: dict[str, Any] = {}
            for system, rs in runs.items():
                good = [r for r in rs if r.correct]
                summary[system] = {
                    "runs": rs,
                    "correct": bool(rs) and all(r.correct for r in rs),
                    "records_per_s": h.summarize([r.records_per_s for r in good]),
                    "cpu_s_per_m": h.summarize([r.cpu_s_per_m for r in good]),
                }
            base = summary["plain"]
            for v in summary.values():
                if base["records_per_s"] and v["records_per_s"]:
                    v["throughput_ratio_to_plain"] = (
                        v["records_per_s"]["median"] / base["records_per_s"]["median"]
                    )
                    v["cpu_ratio_to_plain"] = (
                        v["cpu_s_per_m"]["median"] / base["cpu_s_per_m"]["median"]
                    )
            results[mode] = summary
        await h.delete_topics(bs, list(inputs.values()))
    return results


def report(results: dict[str, Any]) -> None:
    print(
        f"\n{results['input_lines']:,} lines, {results['input_words']:,} words; medians (min..max)"
    )
    targets = {"headrace-alo": 0.60, "headrace-eos": 0.45}
    for mode in ("lines", "keyed"):
        print(f"\n{mode}:")
        print(f"  {'system':14s} {'words/s':>28s} {'cpu-s/M':>8s} {'ratio':>6s}  target")
        for system, v in results[mode].items():
            rps, cpu = v["records_per_s"], v["cpu_s_per_m"]
            if not rps:
                print(f"  {system:14s} WRONG/FAILED")
                continue
            ratio = v.get("throughput_ratio_to_plain", 1.0)
            t = targets.get(system)
            met = "" if t is None else f">= {t:.0%}: {'met' if ratio >= t else 'NOT met'}"
            print(
                f"  {system:14s} {rps['median']:9,.0f} ({rps['min']:,.0f}..{rps['max']:,.0f})"
                f" {cpu['median']:8.1f} {ratio:6.0%}  {met}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--bootstrap")
    ap.add_argument("--show", type=Path, help="print the summary of a saved result JSON")
    args = ap.parse_args()
    if args.show:
        report(json.loads(args.show.read_text()))
        return
    results = asyncio.run(amain(args))
    path = h.BENCH / "results" / f"wordcount-{time.strftime('%Y%m%d-%H%M%S')}.json"
    h.save_json(path, results)
    report(results)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
