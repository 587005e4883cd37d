#!/usr/bin/env python3
"""Turns scripts/bench.sh's results.jsonl into a Markdown table and a
latency-versus-offered-load plot (curve.png, when matplotlib is installed).

    python3 scripts/bench-report.py docs/bench/results.jsonl docs/bench
"""
import json
import sys
from pathlib import Path


def main() -> None:
    results_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    runs = [json.loads(line) for line in results_path.read_text().splitlines() if line.strip()]
    rows = ["| run | mode | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | errors | server CPU µs/req | server RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lat = r["latency_ms"]
        cpu = r.get("server_cpu_us_per_request")
        rss = r.get("server_peak_rss_kib")
        mode = f"{r['mode']} {r['http']} c={r['connections']}"
        if r.get("idle_connections"):
            mode += f" idle={r['idle_connections']}"
        if r.get("target_rate"):
            mode += f" rate={int(r['target_rate'])}"
        errors = sum(r["errors"].values()) if r["errors"] else 0
        cpu_s = f"{cpu:.1f}" if cpu is not None else "-"
        rss_s = f"{rss / 1024:.1f}" if rss is not None else "-"
        rows.append(
            f"| {r['label']} | {mode} | {r['rps']:.0f} | {lat['p50']:.2f} | {lat['p90']:.2f} "
            f"| {lat['p99']:.2f} | {lat['p99_9']:.2f} | {lat['max']:.2f} | {errors} | {cpu_s} | {rss_s} |"
        )
    (out / "results.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))

    curve = sorted((r for r in runs if r["label"].startswith("curve-")), key=lambda r: r["target_rate"])
    if not curve:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    offered = [r["target_rate"] for r in curve]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for key, style in (("p50", "o-"), ("p99", "s-"), ("p99_9", "^-")):
        ax.plot(offered, [r["latency_ms"][key] for r in curve], style, label=key.replace("_", "."))
    ax.set_yscale("log")
    ax.axhline(250, color="red", linestyle="--", linewidth=1, label="KMS timeout (250 ms)")
    ax.axvline(1800, color="grey", linestyle=":", linewidth=1, label="KMS default quota (1,800/s)")
    ax.set_xlabel("offered load (encrypt requests/s, open loop, 64 connections)")
    ax.set_ylabel("latency from intended send time (ms)")
    ax.set_title("xks-proxy on SoftHSM, 2 cores shared with the load generator")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    achieved = ", ".join(f"{int(r['target_rate'])}→{r['rps']:.0f}" for r in curve)
    fig.text(0.01, 0.01, f"offered→achieved req/s: {achieved}", fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out / "curve.png")


if __name__ == "__main__":
    main()
