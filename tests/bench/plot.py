"""Draw results/bench.png from results/bench.json on the host: write bandwidth against message size,
rdax (each queue depth, and RemoteFile.write) beside ib_write_bw; below it, when the run has them, the anchors
(rdax, librpma, NFS v4.2 over RDMA: durable-write bandwidth and 4 KiB latency, the bars' whiskers the spread
over the interleaved blocks) and the rdax / anchor ratios.

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

    vs = doc.get("versus") or {}
    if vs.get("systems"):
        fig = plt.figure(figsize=(12, 11), dpi=110)
        grid = fig.add_gridspec(2, 2, height_ratios=[1.15, 1], width_ratios=[2.2, 1])
        ax = fig.add_subplot(grid[0, :])
        versus_axes(doc, fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1]))
    else:
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


VS_COLORS = {"rdax": "#08519c", "rdax_pyverbs": "#9ecae1", "librpma": "#31a354", "librpma_fiemap": "#a1d99b", "nfs": "#e6550d"}
VS_BW = [("seq_1m_qd64", "1 MiB, qd 64"), ("seq_1m_qd1", "1 MiB, one at a time"), ("seq_4k_qd64", "4 KiB, qd 64"),
         ("lat_4k", "4 KiB, one at a time")]


def _bars(ax, groups: list[str], systems: dict, key: str, label: str) -> float:
    """Bars per (group, system) at the median over blocks, whiskers to the blocks' min and max."""
    names = list(systems)
    width = 0.8 / max(1, len(names))
    top = 0.0
    for i, name in enumerate(names):
        meds, lo, hi = [], [], []
        for g in groups:
            e = systems[name].get(g) or {}
            vals = [v for v in e.get(f"{key}_blocks", []) if v is not None]
            m = e.get(key) or 0
            meds.append(m)
            lo.append(m - min(vals) if vals else 0)
            hi.append(max(vals) - m if vals else 0)
            top = max(top, max(vals) if vals else m)
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(groups))]
        ax.bar(xs, meds, width, yerr=[lo, hi], capsize=2, label=name, color=VS_COLORS.get(name, "#777777"),
               error_kw={"elinewidth": 0.8})
    ax.set_ylabel(label)
    ax.grid(axis="y", alpha=0.3)
    return top


def versus_axes(doc: dict, ax_bw, ax_lat) -> None:
    vs = doc["versus"]
    systems = vs["systems"]
    _bars(ax_bw, [w for w, _ in VS_BW], systems, "bw_mib_s", "durable write bandwidth, MiB/s")
    ax_bw.set_xticks(range(len(VS_BW)), [label for _, label in VS_BW], fontsize=8)
    ax_bw.legend(fontsize=8, frameon=False)
    cpu = vs.get("cpu_put") or {}
    rd, nf = (cpu.get("rdax") or {}).get("node_cpu_s_per_gib"), (cpu.get("nfs") or {}).get("server_cpu_s_per_gib")
    if rd is not None or nf is not None:
        ax_bw.set_xlabel(f"storage-side CPU during a put, s/GiB: rdax-server {'-' if rd is None else f'{rd:.4f}'}, "
                         f"knfsd threads {'-' if nf is None else f'{nf:.4f}'}", fontsize=8)
    r = vs.get("ratios", {})
    fmt = lambda k: "-" if (r.get(k) or {}).get("median") is None else (  # noqa: E731
        f"{r[k]['median']:.2f} [{r[k]['min']:.2f}..{r[k]['max']:.2f}]")
    ax_bw.set_title(f"the anchors, {vs.get('blocks')} interleaved blocks (bars: median, whiskers: min..max)\n"
                    f"rdax/librpma: 1 MiB {fmt('rdax_vs_librpma_bw_1m')}, 4 KiB {fmt('rdax_vs_librpma_bw_4k')}",
                    fontsize=9)
    for i, (fig_key, label) in enumerate((("p50_us", "p50"), ("p99_us", "p99"))):
        names = list(systems)
        width = 0.8 / max(1, len(names))
        for j, name in enumerate(names):
            e = systems[name].get("lat_4k") or {}
            vals = [v for v in e.get(f"{fig_key}_blocks", []) if v is not None]
            m = e.get(fig_key) or 0
            ax_lat.bar(i + (j - (len(names) - 1) / 2) * width, m, width,
                       yerr=[[m - min(vals) if vals else 0], [max(vals) - m if vals else 0]], capsize=2,
                       color=VS_COLORS.get(name, "#777777"), error_kw={"elinewidth": 0.8})
    ax_lat.set_xticks([0, 1], ["p50", "p99"])
    ax_lat.set_ylabel("durable 4 KiB write, us (one at a time)")
    ax_lat.grid(axis="y", alpha=0.3)
    ax_lat.set_title(f"rdax/librpma p50 {fmt('rdax_vs_librpma_lat_4k_p50')}\n"
                     f"rdax/NFS p50 {fmt('rdax_vs_nfs_lat_4k_p50')}", fontsize=9)


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
