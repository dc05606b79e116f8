"""Presents a preset's results: a rich table on the terminal, markdown, JSON and PNG plots.

Ratios are always "this implementation ÷ ours" on the same shape in the same run, so a naive row
reading `time ×ours 6.0` means the naive version took six times as long as ours.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

KERNEL_COLUMNS = ["bench", "N", "H", "V", "K", "impl", "time ms", "peak MiB", "time ×ours", "mem ×ours",
                  "% floor", "% exec", "rel diff", "status"]
E2E_COLUMNS = ["model", "K", "T", "impl", "step ms", "peak MiB", "time ×ours", "mem ×ours", "budget MiB",
               "max T", "loss", "status"]


def _fmt(x, spec: str = ".3g") -> str:
    return "" if x is None else format(x, spec)


def _shape_key(r: dict) -> tuple:
    return tuple(r.get(k) for k in ("bench", "n", "h", "v", "k", "kind", "dtype", "frozen_weight", "model", "t"))


def _ours_by_shape(records: list[dict]) -> dict:
    return {_shape_key(r): r for r in records if r["impl"] == "ours" and r["status"] == "ok"}


def _ratio(r: dict, ours: dict | None, key: str) -> str:
    if r["impl"] == "ours" or ours is None or r.get(key) is None or not ours.get(key):
        return ""
    return f"{r[key] / ours[key]:.2f}"


def _status(r: dict) -> str:
    return r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"


def kernel_rows(records: list[dict]) -> list[list[str]]:
    ours = _ours_by_shape(records)
    rows = []
    for r in records:
        if r["bench"] == "e2e_step":
            continue
        bench = r["bench"] + (f" {r['kind']}" if r["bench"] == "divergence" else "") + \
            (" (frozen W)" if r.get("frozen_weight") else "")
        o = ours.get(_shape_key(r))
        rows.append([bench, str(r["n"]), str(r["h"]), str(r["v"]), str(r["k"]), r["impl"], _fmt(r.get("time_ms")),
                     _fmt(r.get("peak_mib")), _ratio(r, o, "time_ms"), _ratio(r, o, "peak_mib"),
                     _fmt(100 * r["floor_frac"], ".1f") if r.get("floor_frac") else "",
                     _fmt(100 * r["exec_frac"], ".1f") if r.get("exec_frac") else "",
                     _fmt(r.get("rel_diff_vs_naive"), ".1e"), _status(r)])
    return rows


def e2e_rows(records: list[dict]) -> list[list[str]]:
    ours = _ours_by_shape(records)
    rows = []
    for r in records:
        if r["bench"] != "e2e_step":
            continue
        o = ours.get(_shape_key(r))
        max_t = "" if "max_t" not in r else (f"≥{r['max_t']} (cap)" if r.get("capped") else str(r["max_t"]))
        rows.append([r["model"], str(r["k"]), str(r.get("t", "")), r["impl"], _fmt(r.get("time_ms")),
                     _fmt(r.get("peak_mib")), _ratio(r, o, "time_ms"), _ratio(r, o, "peak_mib"),
                     _fmt(r.get("budget_mib"), ".0f"), max_t, _fmt(r.get("loss"), ".6g"), _status(r)])
    return rows


def machine_line(result: dict) -> str:
    m = result["machine"]
    where = f"GPU {m['gpu']}" if "gpu" in m else f"CPU {m['cpu']}"
    partial = "" if result.get("complete", True) else " (INCOMPLETE: the run stopped early)"
    return (f"preset {result['preset']} on {where}, {m['cpu_count']} cores, {m['torch_threads']} torch threads, "
            f"torch {m['torch']}, ops {m['ops_fingerprint']}, {m['utc']} UTC{partial}")


def print_tables(result: dict) -> None:
    """The kernel and end-to-end tables on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    console.print(machine_line(result))
    for title, columns, rows in (("kernels", KERNEL_COLUMNS, kernel_rows(result["records"])),
                                 ("end-to-end SGSD step", E2E_COLUMNS, e2e_rows(result["records"]))):
        if not rows:
            continue
        table = Table(title=title)
        for c in columns:
            table.add_column(c, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def markdown(result: dict) -> str:
    """The same tables as markdown, headed by the machine they were measured on."""
    out = [f"_{machine_line(result)}_", ""]
    for title, columns, rows in (("Kernels", KERNEL_COLUMNS, kernel_rows(result["records"])),
                                 ("End-to-end SGSD step", E2E_COLUMNS, e2e_rows(result["records"]))):
        if not rows:
            continue
        out += [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
        out.append("")
    return "\n".join(out)


def _n_series(records: list[dict]) -> dict:
    """{(bench, H, V, K, kind, dtype): {impl: [(N, time_ms, peak_mib)]}} for groups measured at >= 2 N."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["bench"] != "e2e_step" and r["status"] == "ok":
            key = (r["bench"], r["h"], r["v"], r["k"], r["kind"] if r["bench"] == "divergence" else "", r["dtype"])
            groups[key][r["impl"]].append((r["n"], r["time_ms"], r["peak_mib"]))
    return {k: v for k, v in groups.items() if len({n for pts in v.values() for n, _, _ in pts}) >= 2}


def plot(result: dict, path: Path) -> Path | None:
    """Time and peak memory vs N, one row per kernel group, one line per implementation (log-log)."""
    series = _n_series(result["records"])
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(series), 2, figsize=(11, 3.6 * len(series)), squeeze=False)
    for row, ((bench, h, v, k, kind, dtype), impls) in enumerate(sorted(series.items())):
        for col, (idx, ylabel) in enumerate(((1, "time per call (ms)"), (2, "extra peak memory (MiB)"))):
            ax = axes[row][col]
            for impl, pts in sorted(impls.items()):
                pts = sorted(pts)
                ax.plot([p[0] for p in pts], [p[idx] for p in pts], marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{bench} {kind} H={h} V={v} K={k} {dtype}".replace("  ", " "))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle(machine_line(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_json(result: dict, out_dir: Path) -> Path:
    """`<out_dir>/<preset>.json`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result['preset']}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def write_all(result: dict, out_dir: Path) -> list[Path]:
    """`<preset>.json`, `<preset>.md` and, when some kernel was run at several N, `<preset>.png`."""
    written = [write_json(result, out_dir), out_dir / f"{result['preset']}.md"]
    written[1].write_text(markdown(result))
    png = plot(result, out_dir / f"{result['preset']}.png")
    return written + ([png] if png else [])
