#!/usr/bin/env python3
"""Render zdd-bench's series as one PNG: per supervisor, requests/s answered (line), failed
requests (red dots) and reload/upgrade marks (thin vertical lines).

usage: plot.py OUT_DIR SUPERVISOR...   (reads OUT_DIR/<name>-series.csv, -reloads.csv,
-failures.csv; writes OUT_DIR/zdd-bench.png)
"""
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main():
    out, names = sys.argv[1], sys.argv[2:]
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 3.2 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        series = rows(os.path.join(out, f"{name}-series.csv"))
        marks = rows(os.path.join(out, f"{name}-reloads.csv"))
        fails = rows(os.path.join(out, f"{name}-failures.csv"))
        t = [float(r["t_s"]) for r in series]
        ax.plot(t, [int(r["ok_per_s"]) for r in series], color="tab:blue", lw=0.8, label="answered requests/s")
        for kind, color in (("reload", "tab:green"), ("upgrade", "tab:purple")):
            xs = [float(m["t_s"]) for m in marks if m["kind"] == kind]
            if xs:
                ax.vlines(xs, 0, 1, transform=ax.get_xaxis_transform(), color=color, alpha=0.15, lw=0.5,
                          label=f"{kind} ({len(xs)})")
        ax.set_ylim(bottom=0)
        ax2 = ax.twinx()
        per_bucket = {}
        for f in fails:
            b = round(float(f["t_s"]), 1)
            per_bucket[b] = per_bucket.get(b, 0) + 1
        ax2.scatter(list(per_bucket), list(per_bucket.values()), color="red", s=10,
                    label=f"failed requests per 100 ms ({len(fails)} in all)")
        ax2.set_ylim(bottom=0, top=max([1] + list(per_bucket.values())) * 1.2)
        ax2.set_ylabel("failed / 100 ms")
        ax.set_title(name)
        ax.set_xlabel("seconds")
        ax.set_ylabel("requests/s")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "zdd-bench.png"), dpi=90)


if __name__ == "__main__":
    main()
