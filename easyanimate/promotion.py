"""Should a challenger model version replace the champion? A pure decision on metric dicts.

The rule (margins from ``registry.promotion``):

1. **Gates.** The challenger's data gate (curated-data quality gate) and evaluation gate must both
   have passed; an unknown result counts as failed.
2. **First version.** With no champion, a challenger that passed its gates becomes champion.
3. **Same yardstick.** Both sets of metrics must come from the same held-out data (DVC hash of the
   curated data) and the same evaluation protocol (timesteps, noise seed, sample settings); the
   caller re-evaluates whichever side was scored on something else before asking.
4. **Same latent space for latent metrics.** The DiT validation loss is measured in the version's
   own VAE latent space; when the two versions' VAEs encode differently (``latent_space``, a hash of
   the encoder side, differs or is unknown) that metric is not compared, and the decision rests on the
   pixel-space metrics (the evaluation gate still bounds each version's DiT on its own).
5. **Guard rails.** No compared metric may get worse by more than its tolerance: DiT validation loss
   (``max_val_loss_increase``), VAE PSNR (``max_psnr_drop``), VAE SSIM (``max_ssim_drop``), sample
   flicker (``max_flicker_increase``).
6. **Improvement.** At least one primary metric must improve by more than its margin: DiT
   validation loss down by more than ``min_val_loss_decrease``, or VAE PSNR up by more than
   ``min_psnr_gain``. A retrained copy that scores the same does not churn the alias.

Flicker and SSIM are guard rails only: a frozen video has zero flicker, so less is not always better.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from easyanimate.config import PromotionConfig


@dataclass(frozen=True)
class MetricRule:
    metric: str
    higher_is_better: bool
    tolerance_setting: str  # how much worse it may get (guard rail)
    improvement_setting: str | None = None  # set for primary metrics: how much better counts as better
    latent: bool = False  # measured in the VAE's latent space: comparable only between versions sharing it


RULES: tuple[MetricRule, ...] = (
    MetricRule("eval/val_loss", False, "max_val_loss_increase", "min_val_loss_decrease", latent=True),
    MetricRule("eval/vae_psnr", True, "max_psnr_drop", "min_psnr_gain"),
    MetricRule("eval/vae_ssim", True, "max_ssim_drop"),
    MetricRule("eval/flicker", False, "max_flicker_increase"),
)


@dataclass(frozen=True)
class Candidate:
    """A model version's evaluation, as the decision sees it."""

    version: str
    metrics: dict[str, float]
    data_gate_passed: bool | None
    eval_gate_passed: bool | None
    eval_reasons: str = ""
    data_hash: str = ""  # DVC hash of the curated data the metrics were computed on
    protocol_hash: str = ""  # hash of the evaluation settings the metrics were computed with
    latent_space: str = ""  # SliceVAE.latent_space_id() of the version's VAE ("" = not recorded)


@dataclass(frozen=True)
class MetricComparison:
    metric: str
    challenger: float | None
    champion: float | None
    gain: float | None  # positive = challenger better
    tolerance: float
    within_tolerance: bool
    improved: bool
    comparable: bool = True  # False: a latent metric of versions whose VAEs encode differently


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    challenger: str
    champion: str | None
    comparisons: list[MetricComparison] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "promoted" if self.promote else "rejected"

    def comparison_json(self) -> str:
        return json.dumps([asdict(c) for c in self.comparisons], sort_keys=True)


def _gain(rule: MetricRule, challenger: float, champion: float) -> float:
    return challenger - champion if rule.higher_is_better else champion - challenger


def same_latent_space(challenger: Candidate, champion: Candidate) -> bool:
    return bool(challenger.latent_space) and challenger.latent_space == champion.latent_space


def compare(
    challenger: dict[str, float], champion: dict[str, float], policy: PromotionConfig, latent_comparable: bool = True
) -> list[MetricComparison]:
    """One row per rule metric that both sides have; latent metrics only when ``latent_comparable``."""
    rows = []
    for rule in RULES:
        a, b = challenger.get(rule.metric), champion.get(rule.metric)
        if rule.latent and not latent_comparable:
            rows.append(
                MetricComparison(
                    rule.metric, a, b, None, getattr(policy, rule.tolerance_setting), True, False, comparable=False
                )
            )
            continue
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            rows.append(MetricComparison(rule.metric, a, b, None, getattr(policy, rule.tolerance_setting), True, False))
            continue
        gain = _gain(rule, a, b)
        tolerance = getattr(policy, rule.tolerance_setting)
        improved = rule.improvement_setting is not None and gain > getattr(policy, rule.improvement_setting)
        rows.append(MetricComparison(rule.metric, a, b, gain, tolerance, gain >= -tolerance, improved))
    return rows


def decide(challenger: Candidate, champion: Candidate | None, policy: PromotionConfig) -> Decision:
    """Apply the module's rule; the reason names the setting or gate that decided."""
    ver = challenger.version

    def reject(reason: str, rows: list[MetricComparison] | None = None) -> Decision:
        return Decision(False, reason, ver, champion.version if champion else None, rows or [])

    if challenger.data_gate_passed is not True:
        state = "not recorded" if challenger.data_gate_passed is None else "failed"
        return reject(f"data quality gate {state}")
    if challenger.eval_gate_passed is not True:
        state = "not recorded" if challenger.eval_gate_passed is None else "failed"
        detail = f": {challenger.eval_reasons}" if challenger.eval_reasons else ""
        return reject(f"evaluation gate {state}{detail}")
    if champion is None:
        return Decision(True, "first version whose gates passed", ver, None, [])
    if champion.version == ver:
        return Decision(True, "already the champion", ver, champion.version, [])
    if (challenger.data_hash, challenger.protocol_hash) != (champion.data_hash, champion.protocol_hash):
        return reject(
            f"metrics not comparable: challenger scored on data {challenger.data_hash[:12]}/protocol "
            f"{challenger.protocol_hash[:12]}, champion on {champion.data_hash[:12]}/"
            f"{champion.protocol_hash[:12]}; re-evaluate on the same set"
        )
    rows = compare(challenger.metrics, champion.metrics, policy, same_latent_space(challenger, champion))
    skipped = [r.metric for r in rows if not r.comparable]
    note = (
        f" ({', '.join(skipped)} not compared: the versions' VAEs encode differently, latent space "
        f"{challenger.latent_space[:12] or 'unknown'} vs {champion.latent_space[:12] or 'unknown'})"
        if skipped
        else ""
    )
    worse = [r for r in rows if not r.within_tolerance]
    if worse:
        parts = [
            f"{r.metric} worse by {-r.gain:.4g} > registry.promotion.{rule_for(r.metric).tolerance_setting} "
            f"{r.tolerance:g}"
            for r in worse
        ]
        return reject("regression: " + "; ".join(parts) + note, rows)
    better = [r for r in rows if r.improved]
    if not better:
        margins = ", ".join(
            f"{rule.metric} by > registry.promotion.{rule.improvement_setting} "
            f"{getattr(policy, rule.improvement_setting):g}"
            for rule in RULES
            if rule.improvement_setting and rule.metric not in skipped
        )
        return reject(f"not better than champion v{champion.version}: needs {margins}{note}", rows)
    parts = [f"{r.metric} better by {r.gain:.4g}" for r in better]
    return Decision(
        True, f"better than champion v{champion.version}: " + "; ".join(parts) + note, ver, champion.version, rows
    )


def rule_for(metric: str) -> MetricRule:
    return next(r for r in RULES if r.metric == metric)
