"""Metric vocabulary: every metric name the suite writes, with unit, direction and CI method.

The functions live in the sibling modules and are pure (arrays in, numbers out);
this table is what results, leaderboard and report agree on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    name: str
    unit: str
    higher_is_better: bool | None
    ci_method: str | None
    description: str


def _m(name, unit, hib, ci, desc):
    return name, MetricSpec(name, unit, hib, ci, desc)


METRICS: dict[str, MetricSpec] = dict([
    # discrimination, per label (label=<name>) and macro (label=__macro__), per site and pooled
    _m("auroc", "", True, "delong", "area under the ROC curve; macro rows use a bootstrap CI"),
    _m("auroc_delta", "", None, "delong_paired", "AUROC minus the reference's AUROC on the same images (paired)"),
    _m("delong_p", "", None, None, "two-sided p-value of the paired DeLong test against the reference"),
    _m("prevalence", "", None, None, "fraction of positives among labelled images"),
    # output agreement against the reference, per label and pooled over labels (label=__all__)
    _m("max_abs_diff", "probability", False, None, "max |p - p_ref| over images"),
    _m("mean_abs_diff", "probability", False, None, "mean |p - p_ref| over images"),
    _m("ks_stat", "", False, None, "two-sample Kolmogorov-Smirnov statistic, p vs p_ref"),
    _m("ks_p", "", None, None, "p-value of the two-sample KS test"),
    _m("wasserstein", "probability", False, None, "1-Wasserstein distance between p and p_ref"),
    _m("ba_bias", "probability", None, None, "Bland-Altman mean of p - p_ref"),
    _m("ba_loa_low", "probability", None, None, "Bland-Altman lower limit of agreement (bias - 1.96 sd)"),
    _m("ba_loa_high", "probability", None, None, "Bland-Altman upper limit of agreement (bias + 1.96 sd)"),
    _m("decision_agreement", "fraction", True, None, "fraction of images with the same decision at p=0.5"),
    # cost, label=__none__ site=__all__
    _m("latency_per_image_p50", "s", False, None, "median over batches of batch time / batch size"),
    _m("latency_per_image_p95", "s", False, None, "95th percentile over batches of batch time / batch size"),
    _m("latency_per_batch_p50", "s", False, None, "median time of one predict call"),
    _m("latency_per_batch_p95", "s", False, None, "95th percentile time of one predict call"),
    _m("throughput", "images/s", True, None, "images / total online time"),
    _m("setup_time", "s", False, None, "time of setup (keys, sharing weights, starting parties)"),
    _m("fit_time", "s", False, None, "time of the training step (training track)"),
    _m("audit_time", "s", False, None, "time of the privacy audits (their own phase, after prediction)"),
    _m("online_time", "s", False, None, "total time of all predict calls"),
    _m("wall_time", "s", False, None, "wall time of the whole backend job, process start to exit"),
    _m("peak_rss", "bytes", False, None, "peak resident memory of the backend's process tree"),
    _m("peak_rss_max_process", "bytes", False, None, "largest peak resident memory of one process"),
    _m("bytes_sent", "bytes", False, None, "bytes sent by all parties, online phase"),
    _m("bytes_received", "bytes", False, None, "bytes received by all parties, online phase"),
    _m("bytes_per_image", "bytes", False, None, "online bytes sent by all parties / images"),
    _m("fit_bytes", "bytes", False, None, "bytes sent by all parties while training (training track)"),
    _m("setup_bytes", "bytes", False, None, "bytes sent by all parties during setup"),
    _m("rounds", "rounds", False, None, "communication rounds, online phase (max over parties)"),
    _m("rounds_per_image", "rounds", False, None, "online rounds / images"),
    _m("party_bytes_sent", "bytes", False, None, "bytes one party sent in one phase (columns party, phase)"),
    _m("party_bytes_received", "bytes", False, None, "bytes one party received in one phase"),
    _m("party_rounds", "rounds", False, None, "communication rounds of one party in one phase"),
    _m("messages", "messages", False, None, "messages sent by all parties, online phase (for transports "
       "that count messages, not rounds: then no rounds rows are written)"),
    _m("messages_per_image", "messages", False, None, "online messages / images"),
    _m("party_messages", "messages", False, None, "messages one party sent in one phase"),
    _m("n_images", "images", None, None, "test images this backend configuration saw"),
    _m("batch_size", "images", None, None, "images per predict call"),
])


def spec(name: str) -> MetricSpec:
    """The spec of a known metric; backend-specific metrics may be absent (None)."""
    return METRICS.get(name)
