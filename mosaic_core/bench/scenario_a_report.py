"""Scenario A's tables (``format_scenario_a``): the headline, the staging by part of the prefill, recall against
chance, and the planted span found by budget, from a results report (``scenario_a.run`` makes its rows)."""

from __future__ import annotations

from mosaic_core.bench.scenario_a import SWEEP
from mosaic_core.config import GIB, RetrievalMode
from mosaic_core.engine.probes import UNIT_CEILING


def format_scenario_a(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The scenario A tables as ``(title, header, rows)``: the headline, then those of them the report has data for:
    the staging by part of the prefill, recall against chance, the planted span found by budget."""
    a, pcie = report["A"], report.get("pcie_gbs", 0.0)
    tables = [_headline_table(report, a, pcie)]
    by_part = _transfer_table(a, pcie)
    if by_part:
        tables.append(by_part)
    chance = _chance_table(a)
    if chance:
        tables.append(chance)
    by_budget = _by_budget(a)
    if by_budget:
        tables.append(by_budget)
    return tables


def _headline_table(report: dict, a: dict, pcie: float):
    # measured per row by newer runs; older results files carry one figure that assumed 128 tokens per frame
    history = next((r["history_tokens"] for r in a.values() if "history_tokens" in r), report.get("history_tokens"))
    budget = report.get("budget_tokens")
    share = f"{budget / history:.1%} of {history:,} history tokens" if budget and history else "?"
    headline = [
        [
            label,
            f"{r['ttft_p50_ms']:.1f}",
            f"{r['ttft_p95_ms']:.1f}",
            f"{r['decode_ms_per_token']:.1f}",
            _mib(r["bytes_per_question"]),
            _mib(r["bytes_all_per_question"]),
            f"{r['copies_per_question']:.0f}",
            _num(r["transfer_gbs"], "{:.1f}"),
            _num(r["hit_ratio"], "{:.2f}"),
            f"{r['peak_gpu_bytes'] / GIB:.1f}",
            _num(r["recall"], "{:.3f}"),
            _num(r["probe_found"], "{:.3f}"),
            _num(r.get("kl_vs_full"), "{:.2e}"),
            _num(r.get("hidden_rel_error"), "{:.2e}"),
        ]
        for label, r in a.items()
    ]
    header = [
        "variant", "TTFT p50 ms", "p95", "decode ms/tok", "MiB/q retr", "MiB/q all", "slabs/q", "xfer GB/s",
        "hit", "peak GiB", "recall", "probe found", "KL vs full", "hidden err",
    ]  # fmt: skip
    title = f"Scenario A: one stream, one engine per variant (budget {share}; PCIe {pcie:.1f} GB/s)"
    return title, header, headline


def _chance_table(a: dict):
    """Each retrieving variant's units chosen by every scorer of ``SWEEP`` on the same queries, and the ceiling where
    measured; None where no variant measured them."""
    chance = []
    for label in ("rekv-token", "frame", "cluster"):
        r = a.get(label)
        if not r or not r.get("recall_by_scorer"):
            continue
        unit = "clusters" if r["mode"] == "cluster" else "frame blocks"
        for name in SWEEP:
            chance.append(
                [
                    f"{unit} ({label} engine)",
                    name + (" (own)" if name == (r["scorer"] or _own(r["mode"])) else ""),
                    _num(r["recall_by_scorer"].get(name), "{:.3f}"),
                    _num(r["probe_found_by_scorer"].get(name), "{:.3f}"),
                ]
            )
        if UNIT_CEILING in r["recall_by_scorer"]:
            ceiling = _num(r["recall_by_scorer"][UNIT_CEILING], "{:.3f}")
            chance.append([f"{unit} ({label} engine)", "ceiling: true mass per token", ceiling, "-"])
    if not chance:
        return None
    masses = [f"{r['probe_span_mass']:.2f}" for r in a.values() if r.get("probe_span_mass") is not None]
    title = (
        "Recall against chance: the same queries and units, each scorer's choice (planted span's share of full "
        f"attention: {', '.join(masses)})"
    )
    return title, ["units", "scorer", "recall (real queries)", "planted span found"], chance


def _transfer_table(a: dict, pcie: float):
    """Each variant's staging rate by part of the prefill, with the host's preparation (as ``xfer GB/s``) and the
    copies alone; None where no variant timed any (off CUDA, or results from before the parts were kept)."""
    rows = []
    for label, r in a.items():
        for part, figures in sorted(r.get("transfer_by_part", {}).items()):
            rates = [_rate(figures[key], pcie) for key in ("gbs", "copy_gbs")]
            copies = _num(figures.get("copies_per_question"), "{:.0f}")
            rows.append([label, part, f"{figures['bytes_share']:.1%}", copies, *rates])
    if not rows:
        return None
    title = (
        "Staging by part of the prefill: the layers that choose, each staging its own choice, and the later layers "
        "staged at once (PCIe share in brackets)"
    )
    header = ["variant", "part", "bytes", "copies/q", "GB/s with host preparation", "GB/s copies alone"]
    return (title, header, rows)


def _by_budget(a: dict):
    """Planted span found at each budget (share of the history), per unit and scorer."""
    rows, budgets = [], None
    for label in ("frame", "cluster"):
        r = a.get(label)
        if not r or not r.get("probe_found_at"):
            continue
        at = r["probe_found_at"]
        budgets = sorted({int(key.split("@")[1]) for key in at})
        history = r.get("history_tokens") or 0
        unit = "clusters" if r["mode"] == "cluster" else "frame blocks"
        for name in SWEEP:
            cells = [_num(at.get(f"{name}@{b}"), "{:.3f}") for b in budgets]
            own = " (own)" if name == (r["scorer"] or _own(r["mode"])) else ""
            rows.append([unit, name + own, *cells])
    if not rows:
        return None
    header = ["units", "scorer", *(f"{b:,} ({b / history:.0%})" if history else f"{b:,}" for b in budgets)]
    return ("Planted span found by budget (tokens, share of the history)", header, rows)


def _own(mode: str) -> str:
    return RetrievalMode(mode).own_scorer


def _rate(gbs: float | None, pcie: float) -> str:
    """A rate in GB/s with its share of the PCIe peak."""
    if gbs is None:
        return "-"
    return f"{gbs:.1f} ({gbs / pcie:.0%})" if pcie else f"{gbs:.1f}"


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f}"


def _num(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)
