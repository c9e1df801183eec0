#!/usr/bin/env python3
"""Writes bench/results/latest.md and its chart from the samples bench/run.sh collected.

Inputs (tab-separated, with a header line): --raw, one line per load run (round, scenario,
load "sat" or a rate, path, req/s, requests, errors, p50/p99/p99.9 in ms, CPU-seconds of the
client and server proxy during the run); --rss, VmRSS/VmHWM in KiB per proxy process; --meta,
key/value lines about the machine, the tools and the settings. Every figure in the report is the
median over the rounds with the min-max spread; nothing here judges the numbers.

The chart needs matplotlib (bench/run.sh runs this with the venv it installs it in); without
it the report is written and says the chart is missing.
"""

import argparse
import csv
import statistics
from collections import defaultdict

SCENARIO_NAMES = {
    "h1": "HTTP/1.1 GET",
    "h2": "HTTP/2 GET",
    "grpc": "unary gRPC",
    "grpc-stream": "server-streaming gRPC",
}
SATURATION_TOOL = {
    "h1": "wrk -t1 -c50",
    "h2": "h2load -t1 -c10 -m10",
    "grpc": "h2load -t1 -c10 -m10",
    "grpc-stream": "h2load -t1 -c10 -m10",
}


def read_tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def spread(values, fmt="{:.0f}"):
    """'median (min-max)' of the numbers among values, or '-' when there are none."""
    xs = [x for x in (num(v) for v in values) if x is not None]
    if not xs:
        return "-"
    med = statistics.median(xs)
    if len(xs) == 1 or min(xs) == max(xs):
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def median(values):
    xs = [x for x in (num(v) for v in values) if x is not None]
    return statistics.median(xs) if xs else None


def mib(kib):
    v = num(kib)
    return "-" if v is None else f"{v / 1024:.1f}"


def main():
    ap = argparse.ArgumentParser()
    for a in ("--raw", "--rss", "--meta", "--out", "--chart"):
        ap.add_argument(a, required=True)
    args = ap.parse_args()

    rows = read_tsv(args.raw)
    rss = read_tsv(args.rss)
    meta = {}
    with open(args.meta) as f:
        for line in f:
            k, _, v = line.rstrip("\n").partition("\t")
            meta[k] = v

    paths = []
    scenarios = []
    loads = []
    for r in rows:
        for seq, v in ((paths, r["path"]), (scenarios, r["scenario"]), (loads, r["load"])):
            if v not in seq:
                seq.append(v)
    rates = [ld for ld in loads if ld != "sat"]
    label = {p: meta.get(f"label.{p}", p) for p in paths}
    by = defaultdict(list)
    for r in rows:
        by[(r["scenario"], r["load"], r["path"])].append(r)

    def col(scenario, load, path, key):
        return [r[key] for r in by[(scenario, load, path)]]

    def cpu_per_1k(scenario, load, path, role):
        out = []
        for r in by[(scenario, load, path)]:
            n, cpu = num(r["requests"]), num(r[f"cpu_{role}_s"])
            if n and cpu is not None:
                out.append(cpu / n * 1000)
        return out

    rss_of = {(r["path"], r["role"]): r for r in rss}
    proxied = [p for p in paths if p != "direct"]
    lines = []
    w = lines.append

    w("# Data-plane benchmark: direct, nginx, HAProxy and Ferrule pairs side by side")
    w("")
    w(f"Run {meta.get('started')} ({meta.get('wall')} wall), `{meta.get('command')}`; "
      f"{meta.get('settings')}.")
    w("")
    w(f"Machine: {meta.get('nproc')} CPUs, {meta.get('cpu')}, {meta.get('kernel')}; loopback only; "
      f"load average (1, 5, 15 min) {meta.get('loadavg')}. "
      "The load generator, the backend and every proxy share these CPUs, and all paths run "
      "in the same process set for the whole run, so the figures compare paths with each other; "
      "they are not what a proxy does on a machine of its own.")
    w("")
    w(f"Versions: Ferrule {meta.get('git')} ({meta.get('rustc')}, release)"
      + (f"; {meta['baseline']}" if meta.get("baseline") else "")
      + f"; {meta.get('nginx')}; {meta.get('haproxy')}; {meta.get('wrk')}; {meta.get('h2load')}; "
      "fixed-rate load from proxy/app/examples/bench_load.rs (same build).")
    w("")
    w("Paths, each in front of the same backend (proxy/app/examples/bench_backend.rs, hyper, "
      "two runtime threads):")
    w("")
    w("* **direct**: load generator → backend.")
    w("* **nginx pair**: → nginx → nginx → backend; one process each (`master_process off`, "
      "one worker). nginx proxies HTTP to an upstream only over HTTP/1.1, so its hop between "
      "the two is HTTP/1.1 (keep-alive) for the HTTP/1.1 and HTTP/2 scenarios (HTTP/2 is "
      "accepted from the client and translated), and HTTP/2 (`grpc_pass`) for gRPC.")
    w("* **HAProxy pair**: → haproxy → HTTP/2 → haproxy → backend (HTTP/1.1 for HTTP, HTTP/2 "
      "for gRPC); `nbthread 1` each.")
    w("* **Ferrule pair**: → client sidecar (`--upstream` listener) → mesh HTTP/2 → server "
      "sidecar → backend; static discovery (`--static-endpoint .../meshed`), no controller, "
      "default settings (`--threads 1`: the runtime on one thread).")
    for p in paths:
        if p.startswith("ferrule-") and p != "ferrule-mtls":
            w(f"* **{label[p]}**: the same pair, both sidecars started with these flags.")
    if "ferrule-mtls" in paths:
        w("* **Ferrule mTLS pair**: the same with mutual TLS (TLS 1.3, ECDSA P-256 certificates "
          "from a controller's mesh CA) between the sidecars; the client finds the server "
          "through the controller's discovery (embedded store), the server requires mTLS.")
    if meta.get("baseline"):
        w(f"* **{meta['baseline']}**: the same pair with `ferrule-proxy` built at that revision "
          "(`BENCH_BASELINE_REV`), interleaved in the same rounds.")
    w("")
    missing = []
    for k, v in meta.items():
        if k.startswith("carries.") and v != "yes":
            _, path, scenario = k.split(".", 2)
            missing.append(f"{meta.get('label.' + path, path)} / {SCENARIO_NAMES.get(scenario, scenario)}")
    w("Before measuring, each path is checked to carry each scenario whole (the answer, every "
      "gRPC message and `grpc-status: 0` in the trailers); "
      + ("every path carried every scenario in this run. " if not missing else
         "these did not and were skipped: " + ", ".join(missing) + ". ")
      + "During the load, h2load counts a gRPC call as done on HTTP 200 and a complete "
      "stream (it does not read `grpc-status`); bench_load also requires `grpc-status: 0`. "
      "Server-streaming calls answer "
      f"{meta.get('stream_messages')} empty messages each; their req/s is calls/s.")
    w("")

    if "h1" in scenarios:
        first = rates[0] if rates else None
        w("## Summary (HTTP/1.1)")
        w("")
        w("Medians over the rounds, min–max in brackets. CPU is CPU-seconds per 1,000 requests "
          f"of each proxy process during the {first} req/s runs (client / server).")
        w("")
        w(f"| path | saturation req/s | share of direct | at {first} req/s: p50 / p99 / p99.9 ms "
          "| CPU-s per 1,000 req (client / server) | RSS idle, MiB (client / server) "
          f"| client RSS with {meta.get('idle_conns')} idle conns, MiB |")
        w("| --- | --- | --- | --- | --- | --- | --- |")
        direct_sat = median(col("h1", "sat", "direct", "rps"))
        for p in paths:
            sat = median(col("h1", "sat", p, "rps"))
            share = f"{sat / direct_sat * 100:.1f} %" if sat and direct_sat else "-"
            lat = " / ".join(
                spread(col("h1", first, p, k), "{:.2f}") for k in ("p50_ms", "p99_ms", "p999_ms")
            ) if first else "-"
            if p == "direct":
                cpu = idle = conns = "—"
            else:
                cpu = (spread(cpu_per_1k("h1", first, p, "client"), "{:.3f}") + " / "
                       + spread(cpu_per_1k("h1", first, p, "server"), "{:.3f}"))
                idle = (mib(rss_of.get((p, "client"), {}).get("idle_kib")) + " / "
                        + mib(rss_of.get((p, "server"), {}).get("idle_kib")))
                conns = mib(rss_of.get((p, "client"), {}).get("conns_kib"))
            w(f"| {label[p]} | {spread(col('h1', 'sat', p, 'rps'))} | {share} | {lat} | {cpu} "
              f"| {idle} | {conns} |")
        w("")

    w("## Saturation throughput, req/s")
    w("")
    w("| path | " + " | ".join(f"{SCENARIO_NAMES.get(s, s)} ({SATURATION_TOOL.get(s, '')})"
                               for s in scenarios) + " |")
    w("| --- |" + " --- |" * len(scenarios))
    for p in paths:
        w(f"| {label[p]} | " + " | ".join(spread(col(s, "sat", p, "rps")) for s in scenarios) + " |")
    w("")
    w("Share of direct (medians): ")
    w("")
    w("| path | " + " | ".join(SCENARIO_NAMES.get(s, s) for s in scenarios) + " |")
    w("| --- |" + " --- |" * len(scenarios))
    for p in proxied:
        cells = []
        for s in scenarios:
            d, v = median(col(s, "sat", "direct", "rps")), median(col(s, "sat", p, "rps"))
            cells.append(f"{v / d * 100:.1f} %" if d and v else "-")
        w(f"| {label[p]} | " + " | ".join(cells) + " |")
    w("")

    for rate in rates:
        lags = [num(r["pacer_lag_ms"]) for r in rows if r["load"] == rate]
        lags = [x for x in lags if x is not None]
        w(f"## Latency at {rate} req/s (bench_load, open loop), ms")
        w("")
        w("p50 / p99 / p99.9 (medians over the rounds); the p99's min–max and the achieved "
          "rate below each. The generator dispatches request i at start + i/rate whatever the "
          "answers do and counts latency from the dispatch, a wait for a free HTTP/1.1 "
          "connection included (coordinated omission corrected); HTTP/1.1 over 50 keep-alive "
          "connections, HTTP/2 and gRPC over 10 connections"
          + (f"; its pacer fired up to {max(lags):.1f} ms late (median of the runs' worst: "
             f"{statistics.median(lags):.1f} ms), a measure of how busy the machine was." if lags else "."))
        w("")
        w("| path | " + " | ".join(SCENARIO_NAMES.get(s, s) for s in scenarios) + " |")
        w("| --- |" + " --- |" * len(scenarios))
        for p in paths:
            cells = []
            for s in scenarios:
                med = [median(col(s, rate, p, k)) for k in ("p50_ms", "p99_ms", "p999_ms")]
                if med[0] is None:
                    cells.append("-")
                    continue
                cells.append(" / ".join(f"{m:.2f}" for m in med)
                             + f"<br>p99 {spread(col(s, rate, p, 'p99_ms'), '{:.2f}')}"
                             + f"<br>{spread(col(s, rate, p, 'rps'))} req/s")
            w(f"| {label[p]} | " + " | ".join(cells) + " |")
        w("")

    w("## CPU-seconds per 1,000 requests (client proxy / server proxy)")
    w("")
    w("From utime+stime in `/proc/PID/stat` before and after each run, over the requests "
      "the run completed; medians over the rounds.")
    w("")
    heads = [f"{SCENARIO_NAMES.get(s, s)} {'saturation' if ld == 'sat' else ld + ' req/s'}"
             for s in scenarios for ld in loads]
    w("| path | " + " | ".join(heads) + " |")
    w("| --- |" + " --- |" * len(heads))
    for p in proxied:
        cells = []
        for s in scenarios:
            for ld in loads:
                c, sv = median(cpu_per_1k(s, ld, p, "client")), median(cpu_per_1k(s, ld, p, "server"))
                cells.append("-" if c is None else f"{c:.3f} / {sv:.3f}")
        w(f"| {label[p]} | " + " | ".join(cells) + " |")
    w("")

    w("## Memory, MiB")
    w("")
    w("VmRSS when started (idle, after the readiness check); VmRSS with "
      f"{meta.get('idle_conns')} idle keep-alive client connections open to the client proxy "
      "(each carried one HTTP/1.1 request first; bench/idle_conns.py), measured before any "
      "load; VmHWM (peak) after every load run (the 5,000 req/s runs queue requests on paths "
      "that cannot carry that rate on this machine, which shows in the peak).")
    w("")
    w("| path | process | idle | with idle connections | peak over the run |")
    w("| --- | --- | --- | --- | --- |")
    for p in proxied:
        for role in ("client", "server"):
            r = rss_of.get((p, role), {})
            w(f"| {label[p]} | {role} | {mib(r.get('idle_kib'))} | {mib(r.get('conns_kib'))} "
              f"| {mib(r.get('peak_kib'))} |")
    w("")

    failed = [r for r in rows if (num(r["errors"]) or 0) > 0]
    w("## Errors")
    w("")
    if failed:
        w("Runs with failed requests (non-2xx, socket errors, timeouts):")
        w("")
        for r in failed:
            w(f"* round {r['round']}, {SCENARIO_NAMES.get(r['scenario'], r['scenario'])}, "
              f"{r['load']}, {label[r['path']]}: {r['errors']} of {int(num(r['requests']) or 0) + int(num(r['errors']))}")
    else:
        w("No run had a failed request.")
    w("")

    chart_note = draw_chart(args.chart, paths, label, scenarios, rates, col)
    w("## Chart")
    w("")
    w(chart_note)
    w("")
    w("Raw samples: [latest.tsv](latest.tsv). Profiling recipe: bench/README.md.")

    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


def draw_chart(out, paths, label, scenarios, rates, col):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "No chart: matplotlib is not installed (bench/run.sh installs it into a venv)."

    panels = [("sat", "rps", "saturation throughput, req/s (higher is better)")]
    for rate in rates[:1]:
        panels.append((rate, "p50_ms", f"p50 latency at {rate} req/s, ms (lower is better)"))
    for rate in rates:
        panels.append((rate, "p99_ms", f"p99 latency at {rate} req/s, ms (lower is better)"))
    ncols = 2
    nrows = (len(panels) + 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(15, 5 * nrows), squeeze=False)
    colors = ["#555555", "#2a9d8f", "#e9c46a", "#e76f51", "#8d99ae", "#264653"]
    width = 0.8 / len(paths)
    for ax, (load, key, title) in zip(axes.flat, panels):
        for i, p in enumerate(paths):
            meds, lo, hi = [], [], []
            for s in scenarios:
                xs = [x for x in (num(v) for v in col(s, load, p, key)) if x is not None]
                m = statistics.median(xs) if xs else 0
                meds.append(m)
                lo.append(m - min(xs) if xs else 0)
                hi.append(max(xs) - m if xs else 0)
            xs_pos = [j + (i - (len(paths) - 1) / 2) * width for j in range(len(scenarios))]
            bars = ax.bar(xs_pos, meds, width, yerr=[lo, hi], capsize=3, label=label[p],
                          color=colors[i % len(colors)])
            fmt = "{:.0f}" if key == "rps" else "{:.2f}"
            ax.bar_label(bars, labels=[fmt.format(m) for m in meds], fontsize=7, rotation=90,
                         padding=3)
        ax.set_xticks(range(len(scenarios)))
        ax.set_xticklabels([SCENARIO_NAMES.get(s, s) for s in scenarios])
        if key != "rps":
            # Latencies span four orders of magnitude between an idle path and an overloaded one.
            ax.set_yscale("log")
        ax.set_title(title + (", log scale" if key != "rps" else ""))
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(paths), fontsize=10)
    fig.suptitle("Ferrule bench: medians over the rounds, whiskers min–max")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(out, dpi=80)
    return (f"![throughput and latency per path]({out.rsplit('/', 1)[-1]}) — bars are medians, "
            "whiskers the min–max over the rounds.")


if __name__ == "__main__":
    main()
