"""Scoring predictions, with no model: the metric table, each benchmark's result, and the report (`eval` after a
run, `eval score` alone).

A prediction record is one line of predictions.jsonl: {"benchmark", "id", "prompt", "prediction", "reference" (a
string, or a list for several references), "choices"?, "group"?} or, for an item that could not be answered
(missing or undecodable audio), {"benchmark", "id", "prompt", "reference", "missing": why}. Missing items are counted
and listed, never scored as wrong.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from af2_jax.metrics import (bleu_4, cider_d, exact_match, f1_macro, f1_micro, meteor, mmau_choice, rouge_l,
                             tokenize, tokenizer_name, wer)
from af2_jax.metrics.captions import METEOR_UNAVAILABLE, UNAVAILABLE, meteor_available
from af2_jax.metrics.choice import choices_from_prompt, is_correct_choice
from af2_jax.metrics.exact import is_exact


@dataclasses.dataclass(frozen=True)
class Metric:
    """One benchmark metric. `corpus(predictions, references, choices)` gives {"value": ..., other figures};
    `item(prediction, reference, choices)` one item's score, where the metric has one per item. With `captions`,
    a clip has several references: items with the same audio and prompt are one prediction whose references are
    all their outputs, as the original's evaluation merges its captioning sets (docs/original.md#evaluation)."""

    corpus: Callable[[Sequence[str], Sequence, Sequence], dict]
    item: Callable[[str, object, Sequence[str]], float] | None = None
    captions: bool = False


CAPTION_METRICS = ("bleu_4", "rouge_l", "cider_d", "meteor")


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], main: str) -> dict:
    """Every captioning metric this machine can compute, over captions tokenised in one pass; `main`'s is the
    value. Records the tokeniser and why SPICE / SPIDEr (and METEOR, without java) are absent."""
    flat = tokenize(list(predictions) + [r for refs in references for r in refs])
    said, heard, at = flat[:len(predictions)], [], len(predictions)
    for refs in references:
        heard.append(flat[at:at + len(refs)])
        at += len(refs)
    scores = {"bleu_4": bleu_4(said, heard), "rouge_l": rouge_l(said, heard), "cider_d": cider_d(said, heard)}
    unavailable = dict(UNAVAILABLE)
    if meteor_available():
        scores["meteor"] = meteor(said, heard)
    else:
        unavailable["meteor"] = METEOR_UNAVAILABLE
    return {"value": scores[main], **scores, "tokenizer": tokenizer_name(), "unavailable": unavailable}


def _one_reference_wer(prediction: str, reference: str, choices) -> float | None:
    return wer([prediction], [reference]) if reference.strip() else None


def _mmau(predictions, references, choices) -> dict:
    """MMAU's rule needs each item's options: without them every answer naming the reference would count."""
    if any(not c for c in choices):
        raise ValueError("mmau_choice needs each item's options: a \"choices\" list, or a prompt listing (A) ... "
                         "(B) ...")
    return mmau_choice(predictions, references, choices)


_EXACT = Metric(lambda p, r, c: {"value": exact_match(p, r)}, lambda p, r, c: float(is_exact(p, r)))
METRICS: dict[str, Metric] = {
    "exact_match": _EXACT,
    "accuracy": _EXACT,  # single-label classification: the same comparison
    "mmau_choice": Metric(_mmau, lambda p, r, c: float(is_correct_choice(p, r, c))),
    "f1_macro": Metric(lambda p, r, c: {"value": f1_macro(p, r)}),
    "f1_micro": Metric(lambda p, r, c: {"value": f1_micro(p, r)}, lambda p, r, c: f1_micro([p], [r])),
    "wer": Metric(lambda p, r, c: {"value": wer(p, r)}, _one_reference_wer),
    **{name: Metric(lambda p, r, c, name=name: caption_scores(p, r, name), captions=True)
       for name in CAPTION_METRICS},
}
# Metrics a config may name that are not computed here; their benchmarks are skipped with the reason.
JUDGE_REASON = ("scored by an LLM judge, which is not implemented yet (--judge-url, to an OpenAI-compatible server, "
                "is named for it and off)")
SKIPPED_METRICS = {"judge": JUDGE_REASON, **UNAVAILABLE}
METRIC_NAMES = sorted(METRICS) + sorted(SKIPPED_METRICS)


def skip_reason(metric: str) -> str | None:
    """Why benchmarks of `metric` cannot be scored on this machine, or None."""
    if metric == "meteor" and not meteor_available():
        return METEOR_UNAVAILABLE
    return SKIPPED_METRICS.get(metric)


def _references(record: dict, metric: Metric, benchmark: str) -> object:
    reference = record["reference"]
    if metric.captions:
        return [reference] if isinstance(reference, str) else list(reference)
    if not isinstance(reference, str):
        raise ValueError(f"benchmark {benchmark}, id {record['id']}: the reference is a list, but its metric takes one "
                         "reference per item")
    return reference


def _choices(record: dict) -> list[str]:
    return list(record.get("choices") or choices_from_prompt(record.get("prompt") or ""))


def _scored(metric: Metric, records: list[dict], benchmark: str) -> dict:
    predictions = [r["prediction"] for r in records]
    references = [_references(r, metric, benchmark) for r in records]
    return metric.corpus(predictions, references, [_choices(r) for r in records])


def item_scores(metric_name: str, records: list[dict], benchmark: str) -> list[float | None]:
    """Each answered record's own score (None where the metric has none per item)."""
    metric = METRICS.get(metric_name)
    if metric is None or metric.item is None:
        return [None] * len(records)
    return [metric.item(r["prediction"], _references(r, metric, benchmark), _choices(r)) for r in records]


def score_benchmarks(benchmarks: Sequence, records: Sequence[dict]) -> dict:
    """results.json's "benchmarks": for each benchmark of the config (objects with name, metric, group_by,
    reported), its metric, value (over the `n` answered items), the missing count and items, the reported value and
    the difference, per-group values with `group_by`, and the metric's other figures; or why it was skipped."""
    names = [b.name for b in benchmarks]
    by_name: dict[str, list[dict]] = {name: [] for name in names}
    for record in records:
        if record["benchmark"] not in by_name:
            raise ValueError(f"predictions name the benchmark {record['benchmark']!r}, which the config does not "
                             f"have ({', '.join(names)}); pass --config with it")
        by_name[record["benchmark"]].append(record)
    results = {}
    for b in benchmarks:
        rows = by_name[b.name]
        answered = [r for r in rows if "prediction" in r]
        missing = [r for r in rows if "prediction" not in r]
        entry = {"metric": b.metric, "value": None, "n": len(answered), "missing": len(missing),
                 "reported": b.reported}
        reason = skip_reason(b.metric) or (None if answered else "no predictions")
        if reason:
            entry["skipped"] = reason
        else:
            metric = METRICS[b.metric]
            figures = _scored(metric, answered, b.name)
            entry["value"] = figures.pop("value")
            if b.reported is not None:
                entry["difference"] = entry["value"] - b.reported
            if b.group_by:
                groups: dict[str, list[dict]] = {}
                for r in answered:
                    groups.setdefault(str(r.get("group", r.get(b.group_by, "(none)"))), []).append(r)
                entry["groups"] = {g: {"value": _scored(metric, members, b.name)["value"], "n": len(members)}
                                   for g, members in sorted(groups.items())}
            entry.update(figures)
        if missing:
            entry["missing_items"] = [{"id": r["id"], "why": r.get("missing", "no prediction")} for r in missing]
        results[b.name] = entry
    return results


def _shown(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)


def report_markdown(results: dict, chart: str | None) -> str:
    """report.md: one table (ours, reported, difference), the skipped benchmarks and the missing items."""
    lines = ["# Evaluation report", "",
             f"Checkpoint: `{results.get('checkpoint')}`; config sha256 `{results.get('config_hash', '')[:12]}`; "
             f"seed {results.get('seed')}; wall {_shown(results.get('wall_s'))} s; "
             f"{_shown(results.get('items_per_s'))} items/s.", "",
             "| benchmark | metric | ours | reported | difference | n | missing |", "|---|---|---|---|---|---|---|"]
    benchmarks = results["benchmarks"]
    for name, r in benchmarks.items():
        lines.append(f"| {name} | {r['metric']} | {_shown(r['value'])} | {_shown(r['reported'])} | "
                     f"{_shown(r.get('difference'))} | {r['n']} | {r['missing']} |")
    skipped = [(name, r["skipped"]) for name, r in benchmarks.items() if "skipped" in r]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {name}: {why}" for name, why in skipped]
    missing = [(name, r["missing_items"]) for name, r in benchmarks.items() if r.get("missing_items")]
    if missing:
        lines += ["", "## Missing items (not scored)", ""]
        for name, items in missing:
            lines += [f"- {name}, id {it['id']}: {it['why']}" for it in items[:20]]
            if len(items) > 20:
                lines.append(f"- {name}: {len(items) - 20} more (results.json lists them all)")
    groups = [(name, r["groups"]) for name, r in benchmarks.items() if r.get("groups")]
    for name, per_group in groups:
        lines += ["", f"## {name} by group", "", "| group | ours | n |", "|---|---|---|"]
        lines += [f"| {g} | {_shown(v['value'])} | {v['n']} |" for g, v in per_group.items()]
    if chart:
        lines += ["", f"![ours and reported]({chart})"]
    return "\n".join(lines) + "\n"


def draw_chart(results: dict, path) -> bool:
    """A bar chart of our values beside the reported ones (benchmarks with a value); False when there is none or
    matplotlib (the eval extra) is not installed."""
    rows = [(name, r["value"], r["reported"]) for name, r in results["benchmarks"].items() if r["value"] is not None]
    if not rows:
        return False
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 1.5), 3.5))
    places = range(len(rows))
    axes.bar([p - 0.2 for p in places], [v for _, v, _ in rows], 0.4, label="af2-jax")
    if any(r is not None for _, _, r in rows):
        axes.bar([p + 0.2 for p in places], [r if r is not None else 0.0 for _, _, r in rows], 0.4, label="reported")
    axes.set_xticks(list(places), [name for name, _, _ in rows], rotation=30, ha="right")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
