"""The report's first words: which arm to pick and why, in sentences, from the summary's statistics.

Nothing is computed here that summary/stats do not already hold: the ranking metric and direction, each arm's
rank and tie with the best, and the seed-paired differences from the best per metric (`comparisons`). This
module only chooses what to say: the pick, where it wins and loses by timestep bucket, where loss and sample
quality disagree, and what the seeds did not resolve.
"""

from __future__ import annotations

import re
from typing import Any

from diffusers_optim.report.reading import is_number
from diffusers_optim.report.style import sig

BUCKET = re.compile(r"^val_t/(\d+)-(\d+)$")


def name(row: dict[str, Any]) -> str:
    return str(row.get("arm") or row.get("optimizer"))


def value_text(row: dict[str, Any], key: str) -> str:
    """`0.197 ± 0.002` (half-width of the 95% interval) or the mean alone."""
    mean, low, high = row.get(key), row.get(key + "_ci_low"), row.get(key + "_ci_high")
    if not is_number(mean):
        return "no value"
    half = (high - low) / 2 if is_number(low) and is_number(high) else None
    return sig(mean) + (f" ± {sig(half, 2)}" if half else "")


def bucket_name(key: str) -> str:
    lo, hi = BUCKET.match(key).groups()
    return f"t {lo}-{hi}"


def bucket_verdicts(summary: dict[str, Any], best: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per bucket, the arms the best beats and the arms that beat it, where the paired difference is resolved."""
    wins: dict[str, list[str]] = {}
    losses: dict[str, list[str]] = {}
    for diff in summary.get("comparisons", []):
        if diff.get("b") != best or not BUCKET.match(diff.get("metric", "")) or not diff.get("resolved"):
            continue
        # val_t is a loss: the other arm minus the best > 0 means the best is lower there
        (wins if diff["mean"] > 0 else losses).setdefault(bucket_name(diff["metric"]), []).append(diff["a"])
    return wins, losses


STATE = "optim/state_bytes_per_param"
COST_GAP = 0.9  # an arm "costs less" with at most this share of the others' optimizer-state memory


def cost_sentence(group: list[dict[str, Any]], best: dict[str, Any], extreme: str, metric: str) -> str:
    """The choice inside a set the data cannot split, on optimizer-state memory (measured per parameter, the same on
    any machine; images/s depends on the machine's load, so it decides nothing here)."""
    mean = f"{name(best)} has the {extreme} mean ({value_text(best, metric)})"
    states = {name(r): r[STATE] for r in group if is_number(r.get(STATE))}
    if len(states) < len(group):
        return f"Choose among them on what else matters to you; {mean}."
    least = min(states.values())
    cheap = [k for k, v in states.items() if v * COST_GAP <= least]  # within 10% of the least
    if len(cheap) == len(states):
        return f"They need about the same optimizer-state memory ({sig(least, 2)} B/param): any will do; {mean}."
    dearer = min(v for k, v in states.items() if k not in cheap)
    who = f"{cheap[0]} needs" if len(cheap) == 1 else f"{and_list(cheap)} need"
    return (f"Among them {who} the least optimizer-state memory ({sig(least, 2)} B/param against {sig(dearer, 2)}+); "
            f"{mean}.")


def contenders(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The best arm and every arm not resolved worse than it by a difference that matters."""
    return [r for r in arms if r.get("best") or r.get("verdict") != "worse"]


def pick_sentence(summary: dict[str, Any], arms: list[dict[str, Any]]) -> str:
    """Pick only what is resolved; otherwise name the set the data cannot split and choose in it on cost."""
    metric = summary.get("rank_by", "val/loss")
    direction = "higher" if summary.get("higher_is_better") else "lower"
    extreme = "highest" if summary.get("higher_is_better") else "lowest"
    best = arms[0]
    stats = summary.get("statistics") or {}
    effect = (stats.get("min_effect") or {}).get(metric) or 0.0
    if len(arms) == 1:
        return f"{name(best)} is the only arm with a finished run ({metric} {value_text(best, metric)})."
    if stats.get("resolved_best"):
        margin = f" by at least {sig(effect, 2)}, the smallest difference that matters" if effect else ""
        return (f"Pick {name(best)}: the best {metric} ({value_text(best, metric)}; {direction} is better), "
                f"resolved ahead of every other arm{margin}.")
    seeds = max((r.get(metric + "_n") or 0 for r in arms), default=0)
    if seeds < 2:
        return (f"No pick: one seed per arm gives no interval, so the order may be noise ({name(best)} has the "
                f"{extreme} {metric}, {value_text(best, metric)}); rerun with --seeds 0 1 2.")
    group = contenders(arms)
    equivalent = [name(r) for r in group if r.get("verdict") in ("equivalent", "negligible")]
    text = (f"No single pick on {metric}: {and_list([name(r) for r in group])} are not resolved apart by a "
            "difference that matters")
    if equivalent:
        text += f" ({and_list(equivalent)} {'is' if len(equivalent) == 1 else 'are'} within it of {name(best)})"
    return f"{text}. {cost_sentence(group, best, extreme, metric)}"


def bucket_means_sentence(arms: list[dict[str, Any]]) -> str | None:
    """Without resolved differences: which arm has the lowest mean validation loss in each bucket."""
    best = name(arms[0])
    keys = sorted({k for r in arms for k in r if BUCKET.match(k)}, key=lambda k: int(BUCKET.match(k).group(1)))
    leads, behind = [], []
    for key in keys:
        scored = [r for r in arms if is_number(r.get(key))]
        if not scored:
            continue
        leader = min(scored, key=lambda r: r[key])
        if name(leader) == best:
            leads.append(bucket_name(key))
        else:
            behind.append(f"{name(leader)} at {bucket_name(key)}")
    if not leads and not behind:
        return None
    text = "By timestep bucket (means, not resolved): " + (
        f"{best} has the lowest validation loss at {', '.join(leads)}" if leads
        else f"{best} has the lowest validation loss in no bucket")
    return text + (f"; lower than it: {', '.join(behind)}." if behind else ".")


def bucket_sentence(summary: dict[str, Any], best: str) -> str | None:
    wins, losses = bucket_verdicts(summary, best)
    if not wins and not losses:
        return None
    parts = [f"lower validation loss than {arms} at {buckets}" for arms, buckets in by_arms(wins)]
    parts += [f"higher than {arms} at {buckets}" for arms, buckets in by_arms(losses)]
    return (f"By timestep bucket, {best} has " + "; ".join(parts)
            + " (resolved over seeds by at least each bucket's smallest difference that matters).")


def by_arms(verdicts: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(arms, buckets) clauses: the buckets where the same arms are beaten (or beat the best) share one clause,
    instead of one repeated clause per bucket."""
    grouped: dict[str, list[str]] = {}
    for bucket, arms in sorted(verdicts.items(), key=lambda kv: int(kv[0].split()[1].split("-")[0])):
        grouped.setdefault(", ".join(arms), []).append(bucket)
    return [(arms, and_list(buckets)) for arms, buckets in grouped.items()]


def and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def disagreement_sentence(summary: dict[str, Any], arms: list[dict[str, Any]]) -> str | None:
    """When the ranking metric is sample quality and val/loss would pick another arm (or the other way round)."""
    metric = summary.get("rank_by", "val/loss")
    other = "val/loss" if metric != "val/loss" else next(
        (k for k in ("eval/fd", "eval/fid") if any(is_number(r.get(k)) for r in arms)), None)
    scored = [r for r in arms if is_number(r.get(other))] if other else []
    if not scored:
        return None
    by_other = min(scored, key=lambda r: r[other])  # val/loss and FD/FID: lower is better
    if name(by_other) == name(arms[0]):
        return f"{other} agrees: {name(arms[0])} is best on it too ({value_text(arms[0], other)})."
    return (f"Loss and sample quality disagree: {name(by_other)} has the best {other} "
            f"({value_text(by_other, other)}), {name(arms[0])} the best {metric}. Judge on what you need.")


def unresolved_sentence(summary: dict[str, Any], arms: list[dict[str, Any]]) -> str | None:
    """What the seeds did not resolve (left to the findings section when the summary has paired comparisons)."""
    if "comparisons" in summary:
        return None
    metric = summary.get("rank_by", "val/loss")
    seeds = max((r.get(metric + "_n") or r.get("runs_complete") or 0 for r in arms), default=0)
    if len(arms) < 2:
        return None
    if seeds < 2:
        return ("Nothing here is resolved: one seed per arm gives no interval, so the order may be noise "
                "(rerun with --seeds 0 1 2).")
    tied = [name(r) for r in arms[1:] if r.get("tied")]
    if not tied:
        return f"Every other arm is resolved from {name(arms[0])} on {metric}."
    return (f"Not resolved from {name(arms[0])} on {metric}: {', '.join(tied)}; more seeds could separate them.")


def power_sentence(summary: dict[str, Any], arms: list[dict[str, Any]]) -> str | None:
    """For the arms the seeds could not separate from the best: the smallest difference they resolve, and about
    how many seeds the observed difference would need."""
    metric = summary.get("rank_by", "val/loss")
    parts = []
    for row in arms[1:]:
        diff = row.get("diff_vs_best") or {}
        if row.get("verdict") != "tied" or not is_number(diff.get("resolvable")):
            continue
        need = diff.get("seeds_needed")
        parts.append(f"{name(row)} (gap {sig(abs(diff['mean']), 2)}; these seeds resolve {sig(diff['resolvable'], 2)}"
                     + (f"; about {need} seeds would resolve this gap" if need else "") + ")")
    if not parts:
        return None
    return f"Power on {metric}: " + "; ".join(parts) + "."


def recommendation(summary: dict[str, Any]) -> list[str]:
    """The recommendation as sentences, best arm first; [] when no arm finished."""
    arms = [r for r in (summary.get("arms") or summary.get("optimizers") or [])
            if r.get("runs_complete") and not r.get("unranked")]  # an arm left out of the ranking is never picked
    if not arms:
        return []
    buckets = bucket_sentence(summary, name(arms[0])) or bucket_means_sentence(arms)
    sentences = [pick_sentence(summary, arms), buckets, disagreement_sentence(summary, arms),
                 unresolved_sentence(summary, arms), power_sentence(summary, arms)]
    return [s for s in sentences if s]
