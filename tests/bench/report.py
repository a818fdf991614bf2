"""Figures into words: percentiles, rdax/perftest ratios, and the plain-text table of results/bench.json.

Pure Python with no dependencies, so that the guest (run.py) and the host
(control_host.py, plot.py) share it.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

KiB = 1 << 10
MiB = 1 << 20

RATIO_DEFINITIONS = {
    "write_bw_ge_256k": "lowest, over message sizes >= 256 KiB, of rdax write bandwidth at its best queue depth "
                        "(of 1, 8, 64) / ib_write_bw average bandwidth at the same size",
    "write_bw_4k": "rdax write bandwidth at its best queue depth / ib_write_bw, 4 KiB messages",
    "write_flush_lat_4k_p50": "rdax RDMA WRITE + FLUSH(persistent) p50 (one completion wait) / ib_write_lat "
                              "t_typical, 4 KiB (ib_write_lat reports half a ping-pong round trip)",
}


def size_label(n: int) -> str:
    for unit, factor in (("MiB", MiB), ("KiB", KiB)):
        if n >= factor and n % factor == 0:
            return f"{n // factor} {unit}"
    return f"{n} B"


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary_us(samples_ns: list[int]) -> dict[str, Any]:
    """p50/p99/min/max/mean in microseconds of a list of nanosecond samples."""
    us = [s / 1000.0 for s in samples_ns]
    return {"samples": len(us), "p50_us": _r(percentile(us, 50)), "p99_us": _r(percentile(us, 99)),
            "min_us": _r(min(us)) if us else None, "max_us": _r(max(us)) if us else None,
            "mean_us": _r(sum(us) / len(us)) if us else None}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def _r(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


# -- joining rdax figures to their perftest twins ----------------------------------
def perftest_bw(doc: dict, size: int) -> float | None:
    for row in doc.get("perftest", {}).get("write_bw", []):
        if row.get("size") == size:
            return row.get("bw_mib_s")
    return None


def perftest_lat(doc: dict, size: int) -> dict | None:
    for row in doc.get("perftest", {}).get("write_lat", []):
        if row.get("size") == size:
            return row
    return None


def best_rdax_bw(doc: dict, size: int) -> tuple[float | None, int | None]:
    """rdax's highest bandwidth at `size` over the measured queue depths, and that depth."""
    rows = [r for r in doc.get("rdax", {}).get("write_bw", []) if r.get("size") == size and r.get("bw_mib_s")]
    if not rows:
        return None, None
    best = max(rows, key=lambda r: r["bw_mib_s"])
    return best["bw_mib_s"], best["depth"]


def attach_ratios(doc: dict) -> None:
    """Give every rdax bandwidth and latency figure its ratio to the perftest twin, and fill doc['ratios']."""
    rdax = doc.setdefault("rdax", {})
    for key in ("write_bw", "api_write_bw"):
        for row in rdax.get(key, []):
            row["vs_perftest"] = ratio(row.get("bw_mib_s"), perftest_bw(doc, row["size"]))
    for key in ("write_flush_lat", "write_lat", "api_write_flush_lat"):
        for row in rdax.get(key, []):
            twin = perftest_lat(doc, row["size"]) or {}
            row["vs_perftest_p50"] = ratio(row.get("p50_us"), twin.get("p50_us"))
            row["vs_perftest_p99"] = ratio(row.get("p99_us"), twin.get("p99_us"))

    big = sorted({r["size"] for r in rdax.get("write_bw", []) if r["size"] >= 256 * KiB})
    per_size = {size: ratio(best_rdax_bw(doc, size)[0], perftest_bw(doc, size)) for size in big}
    known = [v for v in per_size.values() if v is not None]
    lat4k = next((r for r in rdax.get("write_flush_lat", []) if r["size"] == 4 * KiB), {})
    for row in rdax.get("first_touch", []):   # 1 MiB writes over a fresh grant, then over the same one again
        row["first_pass_vs_perftest_1mib"] = ratio(row.get("first_pass_mib_s"), perftest_bw(doc, MiB))
        row["second_pass_vs_perftest_1mib"] = ratio(row.get("second_pass_mib_s"), perftest_bw(doc, MiB))
    lat4k_pt = perftest_lat(doc, 4 * KiB) or {}
    doc["ratios"] = {
        "write_bw_ge_256k": min(known) if known and len(known) == len(per_size) else None,
        "write_bw_4k": ratio(best_rdax_bw(doc, 4 * KiB)[0], perftest_bw(doc, 4 * KiB)),
        "write_flush_lat_4k_p50": lat4k.get("vs_perftest_p50"),
        "write_bw_best_by_size": {str(s): v for s, v in per_size.items()},
        "write_flush_lat_4k_p50_vs_round_trip": ratio(lat4k.get("p50_us"),
                                                      2 * lat4k_pt["p50_us"] if lat4k_pt.get("p50_us") else None),
    }
    doc["ratio_definitions"] = {
        **RATIO_DEFINITIONS,
        "write_bw_best_by_size": "rdax at its best queue depth / ib_write_bw, per message size >= 256 KiB",
        "write_flush_lat_4k_p50_vs_round_trip": "rdax write+flush p50 / (2 x ib_write_lat t_typical): against a "
                                                "full perftest round trip, which is what a completion costs",
    }
    attach_versus(doc)
    doc["twins"] = {
        "rdax.write_bw, rdax.api_write_bw": "perftest.write_bw at the same message size (vs_perftest)",
        "rdax.first_touch": "perftest.write_bw at 1 MiB",
        "rdax.write_flush_lat, rdax.write_lat, rdax.api_write_flush_lat":
            "perftest.write_lat at the same size (vs_perftest_p50, vs_perftest_p99)",
        "rdax.grant_cost, rdax.server_memory, rdax.control_plane":
            "none: perftest registers one pinned buffer once, before it starts timing, and has no control plane",
    }


# -- the anchors: librpma and NFS v4.2 over RDMA (tests/bench/versus.py) ----------------
VERSUS_HEADLINE = ("rdax_vs_librpma_lat_4k_p50", "rdax_vs_librpma_bw_1m", "rdax_vs_librpma_bw_4k",
                   "rdax_vs_nfs_lat_4k_p50", "rdax_vs_rdax_pyverbs_lat_4k_p50")
VERSUS_DEFINITIONS = {
    "rdax_vs_librpma_lat_4k_p50": "rdax / librpma, p50 of a durable 4 KiB write one at a time (WRITE + FLUSH"
                                  "(persistent), one wait); below 1: rdax is faster",
    "rdax_vs_librpma_bw_1m": "rdax / librpma, MiB/s of 1 MiB durable sequential writes, pipelined (queue depth 64, "
                             "one FLUSH at the end)",
    "rdax_vs_librpma_bw_4k": "rdax / librpma, MiB/s of 4 KiB durable sequential writes, pipelined (queue depth 64, "
                             "one FLUSH at the end)",
    "rdax_vs_nfs_lat_4k_p50": "rdax / NFS v4.2 over RDMA, p50 of a durable 4 KiB write one at a time (NFS: fio "
                              "O_DIRECT|O_DSYNC pwrite); below 1: rdax is faster",
    "rdax_vs_rdax_pyverbs_lat_4k_p50": "the A/B of the native fast path (rdma/fastpath): rdax's durable 4 KiB "
                                       "p50 / the same connection's through pure pyverbs, per block; below 1: "
                                       "the native path is faster",
    "rdax_node_cpu_s_per_gib": "not a ratio: rdax-server CPU seconds (utime+stime) per GiB during puts over an "
                               "existing file (goal <= 0.01); a new file's put, Seal's zero-fill included, is "
                               "versus.cpu_put.rdax.new_file",
    "rdax_node_data_cpu_s_per_gib": "not a ratio: rdax-server on-CPU seconds (schedstat, all threads) per GiB "
                                    "during the data phase of the same puts only (write_from + FLUSH: while bytes "
                                    "move; session, Seal, Grant and close apart)",
    "nfs_server_cpu_s_per_gib": "not a ratio: knfsd threads' CPU seconds (utime+stime) per GiB for the same bytes "
                                "through NFS (fio over the same existing file)",
}


def attach_versus(doc: dict) -> None:
    """The anchors' headline ratios (each the median of the per-block ratios; versus.ratios has min, max and
    the number of blocks) and the CPU per GiB into doc['ratios']."""
    vs = doc.get("versus")
    if not vs:
        return
    r = doc.setdefault("ratios", {})
    for key, spread in vs.get("ratios", {}).items():
        if key in VERSUS_HEADLINE:
            r[key] = spread.get("median")
    cpu = vs.get("cpu_put") or {}
    r["rdax_node_cpu_s_per_gib"] = (cpu.get("rdax") or {}).get("node_cpu_s_per_gib")
    r["rdax_node_data_cpu_s_per_gib"] = (cpu.get("rdax") or {}).get("node_data_cpu_s_per_gib")
    r["nfs_server_cpu_s_per_gib"] = (cpu.get("nfs") or {}).get("server_cpu_s_per_gib")
    r["versus_blocks"] = vs.get("blocks")
    doc.setdefault("ratio_definitions", {}).update(VERSUS_DEFINITIONS)
    doc["ratio_definitions"]["versus_blocks"] = ("how many interleaved blocks (every system, every workload, "
                                                 "the order rotated) the versus ratios are medians over")


def versus_table_rows(doc: dict) -> list[list[str]]:
    """system, 1 MiB MiB/s (qd64 / qd1), 4 KiB MiB/s (qd64 / qd1), durable 4 KiB p50 / p99: the README's table."""
    rows = []
    for name, sysd in (doc.get("versus", {}).get("systems") or {}).items():
        def g(w: str, k: str, sysd: dict = sysd) -> Any:
            return (sysd.get(w) or {}).get(k)
        rows.append([name, _f(g("seq_1m_qd64", "bw_mib_s")), _f(g("seq_1m_qd1", "bw_mib_s")),
                     _f(g("seq_4k_qd64", "bw_mib_s")), _f(g("lat_4k", "bw_mib_s")),
                     _f(g("lat_4k", "p50_us"), "{:.0f}"), _f(g("lat_4k", "p99_us"), "{:.0f}")])
    return rows


VERSUS_HEAD = ["system", "1 MiB qd64", "1 MiB qd1", "4 KiB qd64", "4 KiB qd1", "4 KiB p50 us", "p99 us"]


def versus_markdown(doc: dict) -> str:
    """The versus table and headline ratios as Markdown (README: Benchmarks):
    python -c 'import json, sys; sys.path.insert(0, "tests/bench"); import report;
               print(report.versus_markdown(json.load(open("results/bench.json"))))'"""
    head = ["system", "1 MiB MiB/s (qd 64)", "1 MiB MiB/s (one at a time)", "4 KiB MiB/s (qd 64)",
            "4 KiB MiB/s (one at a time)", "durable 4 KiB p50 us", "p99 us"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in versus_table_rows(doc)]
    lines += ["", "| ratio | median of per-block ratios | min | max | blocks |", "| --- | --- | --- | --- | --- |"]
    for key, sp in (doc.get("versus", {}).get("ratios") or {}).items():
        lines.append(f"| `{key}` | {_f(sp.get('median'), '{:.2f}')} | {_f(sp.get('min'), '{:.2f}')} | "
                     f"{_f(sp.get('max'), '{:.2f}')} | {sp.get('blocks')} |")
    return "\n".join(lines)


def versus_lines(doc: dict) -> list[str]:
    vs = doc.get("versus")
    if not vs:
        return ["versus (librpma, NFS over RDMA): not run"]
    out = [f"versus: durable writes, MiB/s and us, medians over {vs.get('blocks')} interleaved blocks",
           *_table(VERSUS_HEAD, versus_table_rows(doc)), "",
           "ratios (median of per-block ratios [min .. max], blocks)"]
    for key, sp in vs.get("ratios", {}).items():
        out.append(f"  {key}: {_f(sp.get('median'), '{:.3f}')} [{_f(sp.get('min'), '{:.3f}')} .. "
                   f"{_f(sp.get('max'), '{:.3f}')}], {sp.get('blocks')}")
    cpu = vs.get("cpu_put") or {}
    if cpu:
        out.append(f"storage-side CPU per GiB during puts of {size_label(cpu.get('bytes_per_put') or 0)} "
                   f"(utime+stime s/GiB; schedstat s/GiB; whole guest s/GiB):")
        for name, label in (("rdax", "rdax-server process"), ("nfs", "knfsd threads")):
            for phase in ("overwrite", "new_file"):
                m = (cpu.get(name) or {}).get(phase) or {}
                if m:
                    out.append(f"  {name:<5} {phase:<9} ({label}): {_f(m.get('server_cpu_s_per_gib'), '{:.4f}')}; "
                               f"{_f(m.get('server_run_s_per_gib'), '{:.4f}')}; "
                               f"{_f(m.get('guest_cpu_s_per_gib'), '{:.2f}')}")
    return out


# -- the table ----------------------------------------------------------------------
def _f(x: Any, fmt: str = "{:.1f}") -> str:
    if x is None:
        return "-"
    return fmt.format(x) if isinstance(x, (int, float)) else str(x)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return [fmt(head), fmt(["-" * w for w in widths]), *[fmt(r) for r in rows]]


def bandwidth_lines(doc: dict) -> list[str]:
    rdax = doc.get("rdax", {})
    depths = sorted({r["depth"] for r in rdax.get("write_bw", [])})
    sizes = sorted({r["size"] for r in doc.get("perftest", {}).get("write_bw", [])}
                   | {r["size"] for r in rdax.get("write_bw", [])})
    rows = []
    for size in sizes:
        by_depth = {r["depth"]: r.get("bw_mib_s") for r in rdax.get("write_bw", []) if r["size"] == size}
        api = next((r.get("bw_mib_s") for r in rdax.get("api_write_bw", []) if r["size"] == size), None)
        best, _ = best_rdax_bw(doc, size)
        odp = next((r.get("bw_mib_s") for r in doc.get("perftest", {}).get("write_bw_odp", []) if r["size"] == size),
                   None)
        rows.append([size_label(size), _f(perftest_bw(doc, size)), _f(odp), *[_f(by_depth.get(d)) for d in depths],
                     _f(ratio(best, perftest_bw(doc, size)), "{:.2f}"), _f(api)])
    head = ["size", "ib_write_bw", "(--odp)", *[f"rdax qd{d}" for d in depths], "best/perftest", "RemoteFile.write"]
    return ["write bandwidth, MiB/s", *_table(head, rows)]


def latency_lines(doc: dict) -> list[str]:
    rdax = doc.get("rdax", {})
    rows = []
    for row in rdax.get("write_flush_lat", []):
        size = row["size"]
        twin = perftest_lat(doc, size) or {}
        w = next((r for r in rdax.get("write_lat", []) if r["size"] == size), {})
        api = next((r for r in rdax.get("api_write_flush_lat", []) if r["size"] == size), {})
        rows.append([size_label(size), _f(twin.get("p50_us")), _f(twin.get("p99_us")),
                     _f(w.get("p50_us")), _f(row.get("p50_us")), _f(row.get("p99_us")),
                     _f(row.get("vs_perftest_p50"), "{:.2f}"), _f(api.get("p50_us")), _f(api.get("p99_us"))])
    head = ["size", "ib_write_lat p50", "p99", "rdax write p50", "write+flush p50", "p99", "w+f/perftest p50",
            "RemoteFile.write(flush=True) p50", "p99"]
    return ["write latency, us (ib_write_lat: t_typical and 99% percentile, half a round trip)",
            *_table(head, rows)]


def registration_lines(doc: dict) -> list[str]:
    cost = doc.get("rdax", {}).get("grant_cost", {})
    rows = [[size_label(p["size"]), _f(p.get("grant_ms_p50"), "{:.2f}"), _f(p.get("grant_ms_min"), "{:.2f}"),
             _f(p.get("release_ms_p50"), "{:.2f}"), str(p.get("samples"))] for p in cost.get("points", [])]
    floor = cost.get("rpc_floor_ms_p50")
    return [f"registration: Grant RPC (ODP MR over a sub-range) and Release, ms; Heartbeat RPC floor "
            f"{_f(floor, '{:.2f}')} ms",
            *_table(["grant size", "Grant p50", "min", "Release p50", "n"], rows)]


def memory_lines(doc: dict) -> list[str]:
    mem = doc.get("rdax", {}).get("server_memory", {})
    out = ["server memory (rdax-server VmRSS)"]
    if not mem:
        return out + ["  -"]
    out.append(f"  idle: {_f(mem.get('idle_kib'), '{:.0f}')} KiB")
    for key, label in (("per_session", "per session"), ("per_grant", "per grant")):
        m = mem.get(key) or {}
        out.append(f"  {label}: {_f(m.get('kib_each'), '{:.1f}')} KiB "
                   f"({m.get('count', '-')} opened, {_f(m.get('delta_kib'), '{:.0f}')} KiB in all; {m.get('detail', '')})")
    touched = mem.get("after_writes") or {}
    if touched:
        out.append(f"  after the write benchmarks: VmRSS {_f(touched.get('VmRSS_kib'), '{:.0f}')} KiB, "
                   f"RssFile+RssShmem {_f(touched.get('file_shmem_kib'), '{:.0f}')} KiB "
                   f"(DAX pages the clients' writes faulted into the node's page tables)")
    return out


def control_lines(doc: dict) -> list[str]:
    cp = doc.get("rdax", {}).get("control_plane", {})
    rows = []
    for where, figures in cp.items():
        for op in ("heartbeat", "seal", "unseal", "grant", "release"):
            lat = (figures.get("latency") or {}).get(op)
            if lat:
                rows.append([where, op, _f(lat.get("p50_us") / 1000 if lat.get("p50_us") else None, "{:.2f}"),
                             _f(lat.get("p99_us") / 1000 if lat.get("p99_us") else None, "{:.2f}"),
                             _f(lat.get("ops_per_s"), "{:.0f}"), str(lat.get("samples"))])
        for op, t in (figures.get("concurrent") or {}).items():
            rows.append([where, f"{op} x{t.get('threads')} threads", "", "", _f(t.get("ops_per_s"), "{:.0f}"),
                         str(t.get("ops"))])
    return ["control plane (gRPC), ms; ops/s sequential unless threads",
            *_table(["where", "op", "p50", "p99", "ops/s", "n"], rows)]


def first_touch_lines(doc: dict) -> list[str]:
    rows = [[f"qd{r['depth']}", _f(r.get("first_pass_mib_s")), _f(r.get("second_pass_mib_s"))]
            for r in doc.get("rdax", {}).get("first_touch", [])]
    return ["ODP first touch: 1 MiB writes over a fresh 32 MiB grant, MiB/s (ib_write_bw 1 MiB: "
            f"{_f(perftest_bw(doc, MiB))})", *_table(["depth", "first pass", "second pass"], rows)]


def scale_lines(doc: dict) -> list[str]:
    """Scale of one node (tests/bench/scale.py): Grant against live grants, revocation, the audit."""
    sc = doc.get("scale")
    if not sc:
        return []
    ms = lambda row, k: _f(row[k] / 1000 if row and row.get(k) is not None else None, "{:.1f}")  # noqa: E731
    rows = [[f"Grant, {n} live grants", ms(row, "p50"), ms(row, "p99"), ms(row, "node_p50"), ms(row, "node_p99"), ""]
            for n, row in sc.get("grant_latency_us", {}).items()]
    audit = sc.get("audit", {})
    g = audit.get("grant_latency_us", {})
    for label, key in (("audit running", "during_audit"), ("no audit", "idle")):
        if g.get(key):
            node, wait = g.get(f"node_{key}") or {}, g.get(f"lock_wait_{key}") or {}
            rows.append([f"Grant, {g['seals']} seals, {label}", ms(g[key], "p50"), ms(g[key], "p99"),
                         ms(node, "p50"), ms(node, "p99"), ms(wait, "max")])
    rev = sc.get("revocation") or {}
    for load, r in (rev.get("loads") or {}).items():
        for label, key in (("during a revocation", "during"), ("around it", "outside")):
            client, node = r.get(f"grant_{key}_us") or {}, r.get(f"node_grant_{key}_us") or {}
            in_node, wait = r.get(f"in_node_grant_{key}_us") or {}, r.get(f"lock_wait_{key}_us") or {}
            if client or in_node:
                rows.append([f"Grant {label} ({load})", ms(client, "p50"), ms(client, "p99"),
                             ms(in_node or node, "p50"), ms(in_node or node, "p99"), ms(wait, "max")])
    lines = ["scale of one node, ms (Grant from the client over gRPC; node: inside node.grant, or the in-process "
             "Grant probe during revocations under load 'busy'; lock wait: a thread taking the node's lock every 2 ms)",
             *_table(["what", "p50", "p99", "node p50", "node p99", "lock wait max"], rows)]
    for load, r in (rev.get("loads") or {}).items():
        open_ms, node_ms = r.get("breaker_open_ms") or {}, r.get("node_revocation_ms") or {}
        lines.append(f"  revocation ({load}), 1 seal, {rev.get('sessions')} sessions, {rev.get('grants')} grants, "
                     f"{r.get('trials')} trials: breaker's open() p50 {_f(open_ms.get('p50'))} ms (max "
                     f"{_f(open_ms.get('max'))}), node p50 {_f(node_ms.get('p50'))} ms (goal <= 100 ms)")
    passes = audit.get("pass_ms", {})
    if passes:
        lines.append("  audit pass: " + ", ".join(f"{n} seals {_f(p.get('p50'))} ms" for n, p in passes.items()))
    return lines


def ratio_lines(doc: dict) -> list[str]:
    r = doc.get("ratios", {})
    keys = ["write_bw_ge_256k", "write_bw_4k", "write_flush_lat_4k_p50", "write_flush_lat_4k_p50_vs_round_trip"]
    return ["ratios (rdax / perftest)", *[f"  {k}: {_f(r.get(k), '{:.3f}')}" for k in keys]]


def table(doc: dict) -> str:
    sections = [bandwidth_lines(doc), first_touch_lines(doc), latency_lines(doc), registration_lines(doc),
                memory_lines(doc), control_lines(doc), scale_lines(doc), versus_lines(doc), ratio_lines(doc)]
    sections = [s for s in sections if s]
    if doc.get("problems"):
        sections.append(["problems", *[f"  {p}" for p in doc["problems"]]])
    return "\n\n".join("\n".join(s) for s in sections)
