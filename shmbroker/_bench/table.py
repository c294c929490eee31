"""The terminal table: figures per size, and shmbroker's ratio to each peer."""

from __future__ import annotations

from typing import Any


def fmt_size(n: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def _num(x: float) -> str:
    """Three significant figures, with k/M for rates: readable, never rounded up to flatter."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _us(x: float) -> str:
    return f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]]


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    out = [
        f"shmbroker bench {report['shmbroker_version']}: {m['cpu_model']}, {m['cores']} cores, "
        f"Linux {m['kernel']}, Python {m['python']}, load {' '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}",
    ]
    if report["config"]["quick"]:
        out.append("--quick: few messages per figure; indicative only, do not quote these numbers")
    ratios = {name: {r["size"]: r for r in rows} for name, rows in report.get("ratios", {}).items()}
    ceiling = {c["size"]: c for c in report["ceiling"]["memcpy"]}
    header = ["peer", "msgs/s", "MB/s", "1-way p50", "p99", "p99.9", "RTT p50", "p99", "p99.9", "CPU us/msg", "shmb tput", "shmb RTT"]
    for size in report["config"]["sizes"]:
        rows: list[list[str]] = []
        for name, entry in report["peers"].items():
            figures = next((f for f in entry.get("sizes", []) if f["size"] == size), None)
            if figures is None or not ("throughput" in figures or "latency" in figures):
                continue
            cells = [name]
            t = figures.get("throughput")
            cells += [_num(t["msgs_per_s"]), _num(t["mb_per_s"])] if t else ["-", "-"]
            lat = figures.get("latency")
            for kind in ("one_way_us", "round_trip_us"):
                cells += [_us(lat[kind][p]) for p in ("p50", "p99", "p99_9")] if lat else ["-"] * 3
            cells.append(f"{t['cpu_s_per_msg'] * 1e6:.2f}" if t else "-")
            r = ratios.get(name, {}).get(size, {})
            cells += [_ratio(r.get("throughput")), _ratio(r.get("round_trip_p50"))]
            rows.append(cells)
        c = ceiling.get(size)
        if c:
            rows.append(["memcpy (ceiling)", _num(c["msgs_per_s"]), _num(c["mb_per_s"]), *["-"] * 9])
        out.append("")
        out.append(f"{fmt_size(size)} messages (latency in microseconds)")
        out.extend(_grid(header, rows))
    out.append("")
    out.append("shmb tput: shmbroker's msgs/s over the peer's; shmb RTT: the peer's round-trip p50 over shmbroker's (above 1x: shmbroker is better)")
    attach = report.get("attach", {})
    if attach.get("status") == "ok":
        lat = attach["latency"]["latency_us"]
        rate = attach["rate"]
        out.append(
            f"attach (connect to mapped, {attach['latency']['attaches']} attaches): p50 {_us(lat['p50'])} us, "
            f"p99 {_us(lat['p99'])} us, p99.9 {_us(lat['p99_9'])} us"
        )
        floor = attach["latency"].get("floor_us")
        if floor:
            out.append(
                f"  floor, a bare authenticated fd handoff (accept, SO_PEERCRED, exe stat, memfd, SCM_RIGHTS, map): "
                f"p50 {_us(floor['p50'])} us; shmbroker is {attach['latency']['ratio_to_floor']:.2f}x the floor"
            )
        create = attach["latency"]["create_latency_us"]
        out.append(
            f"attach creating the channel (producer, new segment): p50 {_us(create['p50'])} us, "
            f"p99 {_us(create['p99'])} us, p99.9 {_us(create['p99_9'])} us"
        )
        out.append(
            f"attach rate, {rate['clients']} client processes attaching and closing for {rate['seconds']:.1f} s: "
            f"{_num(rate['attaches_per_s'])} attaches/s, broker CPU {rate['broker_cpu_s_per_attach'] * 1e6:.0f} us/attach"
        )
    elif attach:
        out.append(f"attach: FAILED: {attach.get('error')}")
    for name, entry in report["peers"].items():
        if entry["status"] == "skipped":
            out.append(f"{name}: skipped: {entry['skipped']}")
        elif entry["status"] == "failed":
            errors = [f"{fmt_size(f['size'])}: {f['error']}" for f in entry.get("sizes", []) if "error" in f]
            out.append(f"{name}: FAILED: {entry.get('error') or '; '.join(errors)}")
    return "\n".join(out)
