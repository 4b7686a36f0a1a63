"""Markdown for people: the evaluation report and the challenger-vs-champion promotion report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from easyanimate.promotion import Candidate, Decision, rule_for


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.6g}"


def _gif_links(samples: Sequence[str | Path], relative_to: Path | None) -> str:
    gifs = [Path(s) for s in samples if str(s).endswith(".gif")]
    if not gifs:
        return "_no samples_"
    lines = []
    for gif in gifs:
        shown = os.path.relpath(gif, relative_to) if relative_to else str(gif)
        lines.append(f"![{gif.stem}]({shown}) [{gif.name}]({shown})")
    return "\n".join(lines)


def evaluation_markdown(
    metrics: dict[str, float],
    passed: bool,
    reasons: Sequence[str],
    skipped: dict[str, str],
    samples: Sequence[str | Path],
    relative_to: Path | None = None,
) -> str:
    verdict = "PASSED" if passed else "FAILED: " + "; ".join(reasons)
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items()))
    not_computed = "\n".join(f"- {k}: {v}" for k, v in skipped.items()) or "- nothing"
    return (
        f"## Evaluation {verdict}\n\n| metric | value |\n|---|---|\n{rows}\n\n"
        f"### Not computed\n{not_computed}\n\n### Samples\n{_gif_links(samples, relative_to)}\n"
    )


def promotion_markdown(
    decision: Decision,
    challenger: Candidate,
    champion: Candidate | None,
    champion_source: str,
    samples: Sequence[str | Path] = (),
    dry_run: bool = False,
) -> str:
    """Comparison table of every metric either side has; rule metrics show their gain and tolerance."""
    title = f"## Promotion of v{challenger.version}: {decision.label.upper()}" + (" (dry run)" if dry_run else "")
    head = [
        title,
        "",
        f"**Reason:** {decision.reason}",
        "",
        f"- data gate: {challenger.data_gate_passed}; evaluation gate: {challenger.eval_gate_passed}"
        + (f" ({challenger.eval_reasons})" if challenger.eval_reasons else ""),
        f"- held-out data (DVC hash): `{challenger.data_hash}`; evaluation protocol: `{challenger.protocol_hash}`",
    ]
    if champion is None:
        head.append(f"- champion: {champion_source}")
        table = ["| metric | challenger |", "|---|---|"]
        table += [f"| {k} | {_fmt(v)} |" for k, v in sorted(challenger.metrics.items())]
    else:
        head.append(f"- champion v{champion.version} metrics: {champion_source}")
        by_metric = {c.metric: c for c in decision.comparisons}
        table = [
            f"| metric | challenger v{challenger.version} | champion v{champion.version} | gain | tolerance | ok |",
            "|---|---|---|---|---|---|",
        ]
        for key in sorted(set(challenger.metrics) | set(champion.metrics)):
            row = by_metric.get(key)
            if row is None:
                table.append(
                    f"| {key} | {_fmt(challenger.metrics.get(key))} | {_fmt(champion.metrics.get(key))} | | | |"
                )
                continue
            if not row.comparable:
                table.append(
                    f"| {key} | {_fmt(row.challenger)} | {_fmt(row.champion)} | | | not compared: "
                    f"different VAE latent spaces |"
                )
                continue
            ok = ("improved" if row.improved else "within") if row.within_tolerance else "WORSE"
            tolerance = f"{row.tolerance:g} (registry.promotion.{rule_for(key).tolerance_setting})"
            table.append(
                f"| **{key}** | {_fmt(row.challenger)} | {_fmt(row.champion)} | {_fmt(row.gain)} | {tolerance} | {ok} |"
            )
    return "\n".join(head + ["", *table, "", "### Challenger samples", _gif_links(samples, None), ""])
