"""Draw results/bench.png from results/bench.json on the host: write bandwidth against message size,
rdax (each queue depth, and RemoteFile.write) beside ib_write_bw.

    .venv/bin/python tests/bench/plot.py results/bench.json results/bench.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import best_rdax_bw, perftest_bw, ratio, size_label  # noqa: E402


def plot(doc: dict, out: Path) -> None:
    rdax = doc.get("rdax", {})
    sizes = sorted({r["size"] for r in doc.get("perftest", {}).get("write_bw", [])}
                   | {r["size"] for r in rdax.get("write_bw", [])})
    depths = sorted({r["depth"] for r in rdax.get("write_bw", [])})
    series = [("ib_write_bw (perftest, tx depth 128)", "#444444",
               [perftest_bw(doc, s) for s in sizes])]
    odp = {r["size"]: r.get("bw_mib_s") for r in doc.get("perftest", {}).get("write_bw_odp", [])}
    if odp:
        series.append(("ib_write_bw --odp (perftest, ON_DEMAND buffers)", "#aaaaaa", [odp.get(s) for s in sizes]))
    blues = ["#9ecae1", "#4292c6", "#08519c", "#08306b"]
    for i, d in enumerate(depths):
        vals = {r["size"]: r.get("bw_mib_s") for r in rdax.get("write_bw", []) if r["depth"] == d}
        series.append((f"rdax Connection.write, queue depth {d}", blues[i % len(blues)], [vals.get(s) for s in sizes]))
    api = {r["size"]: r.get("bw_mib_s") for r in rdax.get("api_write_bw", [])}
    if api:
        series.append(("rdax RemoteFile.write (copy + wait per call)", "#fd8d3c", [api.get(s) for s in sizes]))

    fig, ax = plt.subplots(figsize=(11, 6), dpi=110)
    width = 0.8 / len(series)
    for i, (label, color, vals) in enumerate(series):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(sizes))]
        ax.bar(xs, [v or 0 for v in vals], width, label=label, color=color)
    top = max([v for _, _, vals in series for v in vals if v] or [1])
    for k, s in enumerate(sizes):
        r = ratio(best_rdax_bw(doc, s)[0], perftest_bw(doc, s))
        group_top = max([vals[k] for _, _, vals in series if vals[k]] or [0])
        if r is not None:
            ax.annotate(f"best rdax / perftest {r:.2f}", (k, group_top + top * 0.02), ha="center", va="bottom",
                        fontsize=8)
    ax.set_xticks(range(len(sizes)), [size_label(s) for s in sizes])
    ax.set_xlabel("message size (one RDMA WRITE per message)")
    ax.set_ylabel("write bandwidth, MiB/s")
    ax.set_ylim(0, top * 1.12)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.11), fontsize=8, ncol=3, frameon=False)
    r = doc.get("ratios", {})
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    ax.set_title("rdax vs perftest: sequential RDMA WRITE into a DAX file, soft-RoCE across two namespaces\n"
                 f"(qemu TCG lab, {doc.get('started', '?')}; ratios: >=256 KiB {fmt(r.get('write_bw_ge_256k'))}, "
                 f"4 KiB {fmt(r.get('write_bw_4k'))}, write+flush 4 KiB p50 {fmt(r.get('write_flush_lat_4k_p50'))})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: plot.py BENCH_JSON OUT_PNG", file=sys.stderr)
        return 2
    src, out = Path(argv[0]), Path(argv[1])
    plot(json.loads(src.read_text()), out)
    print(f"plot: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
