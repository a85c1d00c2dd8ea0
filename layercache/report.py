"""Build reports: ``report.json`` for machines, ``report.md`` for people, one PNG per head (paper Fig. 5)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from layercache.evaluation import pct

logger = logging.getLogger(__name__)


def _hindsight_lines(report: Mapping[str, Any]) -> list[str]:
    if report.get("hindsight_flops_selected") is None:
        return []
    return [
        f"Hindsight thresholds: {_mflops(report['hindsight_flops_selected'])} "
        f"({report['hindsight_over_oracle_selected'] or float('nan'):.3f} x the selected heads' oracle), the cheapest "
        f"thresholds for the selected heads at agreement >= {pct(1 - report['tolerance'])}, chosen knowing the "
        "held-out answers (no threshold rule does better on these rows; the rest of the gap to the oracle is the "
        "heads' confidence).",
        "",
    ]


def _mflops(v: float) -> str:
    return f"{v / 1e6:.1f}M"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: Table 2 (per exit) and Table 3 (FLOPs) of the paper, plus candidates."""
    lines = [
        "# layercache build report",
        "",
        f"Tolerance {report['tolerance']} (accuracy drop budget), subset selected by {report['cost']}. "
        f"Logged rows: {report['rows']['total']} (train {report['rows']['train']}, validation "
        f"{report['rows']['val']}, test {report['rows']['test']}). Evaluated on the test split, which the heads "
        "never trained or calibrated on.",
        "",
        "## Exits (paper Table 2)",
        "",
        "| exit | node | head | threshold | hit rate | cache accuracy | GT accuracy | accuracy effect |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, e in enumerate(report["exits"], 1):
        lines.append(
            f"| {i} | `{e['node']}` | {e['head']} | {e['threshold']:.4f} | {pct(e['hit_rate'])} | "
            f"{pct(e['cache_accuracy'])} | {pct(e['gt_accuracy'])} | {pct(e['accuracy_effect'])} |"
        )
    if not report["exits"]:
        lines.append("| - | no head pays off at this tolerance | | | | | | |")
    floor = report.get("min_tolerance")
    if floor and report["tolerance"] < floor:
        lines += [
            "",
            f"Tolerance {report['tolerance']} is below the {floor:.4f} that {report['rows']['val']} validation rows "
            "can vouch for: record more traffic or raise `--tolerance`.",
        ]
    lines += [
        "",
        f"Agreement with the backbone: {pct(report['agreement'])}. GT accuracy original "
        f"{pct(report['gt_accuracy_original'])}, cached {pct(report['gt_accuracy_cached'])}.",
        "",
        "## FLOPs per request (paper Table 3)",
        "",
        "| original | cached | ratio | oracle: selected heads | achieved / oracle | oracle: all candidates "
        "| achieved / oracle |",
        "|---|---|---|---|---|---|---|",
        f"| {_mflops(report['mean_flops_original'])} | {_mflops(report['mean_flops_cached'])} | "
        f"{report['flops_ratio']:.3f} | {_mflops(report.get('oracle_flops_selected', float('nan')))} | "
        f"{(report.get('achieved_over_oracle_selected') or float('nan')):.3f} | {_mflops(report['oracle_flops'])} | "
        f"{(report['achieved_over_oracle'] or float('nan')):.3f} |",
        "",
        "Oracle: every row leaves at the earliest head that agrees with the backbone (the selected heads, or every "
        "trained candidate head); the limit of a cascade of those heads.",
        "",
        *_hindsight_lines(report),
        f"FLOPs: {report['flops_counter']}.",
        "",
        "## Size",
        "",
        f"Backbone {report['model_bytes']['backbone'] / 2**20:.2f} MiB, heads "
        f"{report['model_bytes']['heads'] / 2**20:.3f} MiB (+{100 * report['model_bytes']['growth']:.1f}%).",
        "",
        "## Candidate layers",
        "",
        "| node | shape | FLOPs after | head | val agreement | selected | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in report["candidates"]:
        lines.append(
            f"| `{c['node']}` | {c['shape']} | {_mflops(c['flops_remaining'])} | {c['head'] or '-'} | "
            f"{pct(c['val_agreement'])} | {'yes' if c['selected'] else ''} | {c['discarded'] or ''} |"
        )
    lines += ["", f"Build time: {report.get('build_seconds', 'n/a')} s.", ""]
    return "\n".join(lines)


def plot_curves(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """One PNG per head: hit rate, cache accuracy (and GT accuracy) against the threshold (paper Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for c in report["candidates"]:
        curve = c.get("curve") or {}
        if not curve:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(curve["threshold"], curve["hit_rate"], label="hit rate")
        ax.plot(curve["threshold"], curve["cache_accuracy"], label="cache accuracy")
        if "gt_accuracy" in curve:
            ax.plot(curve["threshold"], curve["gt_accuracy"], label="GT accuracy")
        chosen = [e for e in report["exits"] if e["node"] == c["node"]]
        if chosen and math.isfinite(chosen[0]["threshold"]):
            ax.axvline(chosen[0]["threshold"], color="grey", linestyle="--", label="threshold")
        ax.set_xlabel("confidence threshold")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{c['node']} ({c['head']})", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"head_{c['node'].replace('.', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``report.json``, ``report.md`` and the plots into ``out_dir`` (created)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Strict JSON for machines: NaN (no hits) and inf (a disabled head) become strings, never bare NaN/Infinity.
    (out_dir / "report.json").write_text(json.dumps(_finite(report), indent=2, default=_json_default, allow_nan=False))
    (out_dir / "report.md").write_text(markdown(report))
    paths = [out_dir / "report.json", out_dir / "report.md", *plot_curves(report, out_dir)]
    logger.info("report written to %s", out_dir)
    return paths


def _finite(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return _finite(o.tolist())
    return str(o)
