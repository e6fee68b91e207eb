"""Charts of the benchmark tools' saved results (matplotlib, Agg backend: no display needed).

    .venv/bin/python tools/plots.py RESULTS.json [OUT.png]

draws the chart of a results file, whichever tool saved it: `tools/bench.py --json` (images/s
by engine and batch size, one panel per variant), `tools/loadtest.sh --json` or
`tools/v2_load.py --json` (requests/s and p99 latency against concurrent clients). OUT.png
defaults to RESULTS.png. The tools call the same functions for their `--plot` option; matplotlib
is imported only when a chart is drawn, so the tools run without it otherwise.

A load results file is {"kind": "load", "tool": ..., "meta": {"cpu", "threads", "subtitle", ...},
"groups": [{"name", "model_only_per_s"?, "model_only_label"?, "p99_bound_ms"?}, ...],
"rows": [{"group", "series", "clients", "requests_per_s", "p99_ms", ...}, ...]}: one column of
panels per group (a model), one line per series (a front door) in each panel; rows repeated
for the same group, series and clients (rounds) are drawn as their median with min-max error
bars; a group's model-only rate and p99 bound, where given, as dashed lines.
"""
import json
import os
import statistics
import sys
import textwrap


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def bench_chart(path, results, engines, variants, batches, meta):
    """Grouped bars: results[(engine, variant, batch)] = [img/s per round] -> PNG at `path`."""
    plt = _pyplot()
    colors = plt.get_cmap("tab10").colors
    n = len(engines)
    width = 0.8 / n
    panel_w = max(4.0, 0.32 * n * len(batches) + 1.4)
    fig_w = max(8.0, panel_w * len(variants))
    ncol = min(n, max(1, int(fig_w / 1.9)))
    legend_rows = -(-n // ncol)
    fig, axes = plt.subplots(1, len(variants), figsize=(fig_w, 5.0 + 0.25 * legend_rows), squeeze=False)
    for ax, v in zip(axes[0], variants):
        top = 0.0
        for i, e in enumerate(engines):
            xs, med, lo, hi = [], [], [], []
            for j, b in enumerate(batches):
                r = results.get((e, v, b))
                if r:
                    m = statistics.median(r)
                    xs.append(j - 0.4 + width * (i + 0.5))
                    med.append(m)
                    lo.append(m - min(r))
                    hi.append(max(r) - m)
                    top = max(top, max(r))
            ax.bar(xs, med, width * 0.92, yerr=[lo, hi], capsize=2, color=colors[i % len(colors)],
                   label=e, error_kw={"lw": 0.8})
            for x, m, h in zip(xs, med, hi):
                ax.text(x, m + h, f" {m:.0f}", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_title(f"FasterNet-{v.upper()}")
        ax.set_ylabel("images/s")
        ax.set_ylim(0, top * 1.22 or 1)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles, labels = {}, []
    for ax in axes[0]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in handles:
                handles[l] = h
                labels.append(l)
    fig.legend([handles[l] for l in labels], labels, loc="lower center", ncol=ncol, frameon=False)
    precision = "fp32 (bf16 where named)" if meta.get("bf16") else "fp32"
    rounds = meta["rounds"]
    subtitle = (f"{precision}, {meta['size']}x{meta['size']}, random weights; median of {rounds} "
                f"round{'s' if rounds != 1 else ''} x {meta['seconds']:g} s, error bars min-max; "
                f"{meta.get('date', '')}")
    fig.suptitle(f"FasterNet images/s on {meta['cpu']}, {meta['threads']} threads\n"
                 + textwrap.fill(subtitle, int(fig_w * 11)), fontsize=10)
    fig.tight_layout(rect=(0, (0.12 + 0.27 * legend_rows) / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_chart(path, data):
    """Requests/s (top) and p99 latency (bottom) against clients, one column per group."""
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, NullLocator
    colors = plt.get_cmap("tab10").colors
    rows, meta = data["rows"], data["meta"]
    groups = data.get("groups") or [{"name": g} for g in dict.fromkeys(r["group"] for r in rows)]
    series = list(dict.fromkeys(r["series"] for r in rows))
    levels = sorted({r["clients"] for r in rows})
    fig_w = max(7.5, 4.6 * len(groups))
    fig, axes = plt.subplots(2, len(groups), figsize=(fig_w, 7.2), squeeze=False, sharex=True)
    for col, g in enumerate(groups):
        top, bottom = axes[0][col], axes[1][col]
        for i, s in enumerate(series):
            pts = {}
            for r in rows:
                if r["group"] == g["name"] and r["series"] == s:
                    pts.setdefault(r["clients"], []).append(r)
            if not pts:
                continue
            xs = sorted(pts)
            for ax, key in ((top, "requests_per_s"), (bottom, "p99_ms")):
                vals = [[r[key] for r in pts[x]] for x in xs]
                med = [statistics.median(v) for v in vals]
                err = [[m - min(v) for m, v in zip(med, vals)], [max(v) - m for m, v in zip(med, vals)]]
                ax.errorbar(xs, med, yerr=err if any(len(v) > 1 for v in vals) else None,
                            marker="o", ms=4, capsize=3, color=colors[i % len(colors)],
                            label=s if len(series) > 1 else None)
                for x, m in zip(xs, med) if len(series) == 1 else ():  # one line: its values
                    ax.annotate(f"{m:.0f}" if m >= 10 else f"{m:.1f}", (x, m), textcoords="offset points",
                                xytext=(0, 6), ha="center", fontsize=7, color=colors[i % len(colors)])
        if g.get("model_only_per_s"):
            top.axhline(g["model_only_per_s"], ls="--", lw=1, color="gray",
                        label=g.get("model_only_label", "model only"))
        if g.get("p99_bound_ms"):
            bottom.axhline(g["p99_bound_ms"], ls="--", lw=1, color="firebrick",
                           label=g.get("p99_bound_label", "p99 bound"))
        top.set_title(g["name"])
        top.set_ylabel(meta.get("rate_label", "requests/s"))
        bottom.set_ylabel("p99 latency (ms)")
        bottom.set_xlabel("concurrent clients (closed loop)")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(levels))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(c) for c in levels])
            ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[1]:
                ax.legend(fontsize=8, loc="best")
    threads = f", server --threads {meta['threads']}" if meta.get("threads") else ""
    title = f"{data.get('tool', 'load test')} on {meta['cpu']}{threads}"
    if meta.get("subtitle"):
        title += "\n" + textwrap.fill(meta["subtitle"], int(fig_w * 11))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chart_from_file(src, out=None):
    """Draws the chart of a saved results file (bench or load); returns the PNG's path."""
    with open(src) as f:
        data = json.load(f)
    out = out or os.path.splitext(src)[0] + ".png"
    if data.get("kind") == "bench":
        results = {(r["engine"], r["variant"], r["batch"]): r["images_per_s"] for r in data["results"]}
        bench_chart(out, results, data["engines"], data["variants"], data["batch"], data["meta"])
    elif data.get("kind") == "load":
        load_chart(out, data)
    else:
        raise SystemExit(f"{src}: not a results file of tools/bench.py, tools/loadtest.sh or tools/v2_load.py")
    return out


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 3 or sys.argv[1].startswith("-"):
        raise SystemExit(__doc__.split("\n\n")[1])
    print(f"chart written to {chart_from_file(*sys.argv[1:])}", file=sys.stderr)
