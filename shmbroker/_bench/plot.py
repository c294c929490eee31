"""The PNG: throughput and round-trip latency per message size, every peer
against the memcpy ceiling."""

from __future__ import annotations

from typing import Any

from .table import fmt_size


def draw(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and never pick a GUI backend
    import matplotlib.pyplot as plt

    sizes = report["config"]["sizes"]
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(13, 5.5), constrained_layout=True)
    for name, entry in report["peers"].items():
        style = {"linewidth": 3, "color": "black", "zorder": 5} if name == "shmbroker" else {"linewidth": 1.5}
        tput = [f for f in entry.get("sizes", []) if "throughput" in f]
        if tput:
            ax_t.plot([f["size"] for f in tput], [f["throughput"]["mb_per_s"] for f in tput], marker="o", label=name, **style)
        lat = [f for f in entry.get("sizes", []) if "latency" in f]
        if lat:
            ax_l.plot([f["size"] for f in lat], [f["latency"]["round_trip_us"]["p50"] for f in lat], marker="o", label=f"{name} p50", **style)
    ceiling = report["ceiling"]["memcpy"]
    if ceiling:
        ax_t.plot([c["size"] for c in ceiling], [c["mb_per_s"] for c in ceiling], linestyle="--", color="grey", label="memcpy (ceiling)")
    for ax in (ax_t, ax_l):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [fmt_size(s) for s in sizes])
        ax.set_xlabel("message size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    ax_t.set_ylabel("throughput, MB/s (one way, consumer copies each payload)")
    ax_t.set_title("Throughput")
    ax_l.set_ylabel("round trip, microseconds (p50)")
    ax_l.set_title("Latency")
    m = report["machine"]
    note = " (--quick: indicative only)" if report["config"]["quick"] else ""
    load = f", load {m['loadavg_at_start'][0]:.2f} at start" if m.get("loadavg_at_start") else ""
    fig.suptitle(f"shmbroker bench: {m['cpu_model']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}{load}{note}", fontsize="medium")
    fig.savefig(path, dpi=100)
    plt.close(fig)
