"""`tunelab review report`: per-model and per-item results, agreement, outlying reviewers, plots,
and (with a reward model) how well that model agrees with the held-out human rankings.

`summarise` computes everything as plain data (the CLI prints it, tests check it);
`write_report` renders it to one self-contained HTML file with its plots embedded.
"""

from __future__ import annotations

import base64
import json
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import rankdata

from tunelab.review import agreement
from tunelab.review.aggregate import Reviews, consensus, load
from tunelab.review.export import write_text
from tunelab.review.pages import fmt, render
from tunelab.review.store import Store

# Outlier floors, in the units of each distance: rubric distance is a share of the scale
# (0.15 = 0.6 points on 1-5), rank disagreement a share of comparisons.
RUBRIC_FLOOR, RANK_FLOOR = 0.15, 0.2


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _model_ranks(reviews: Reviews) -> dict[str, dict]:
    """Per model: win rate over outputs of other models in the same ranking (a tie = half a win)
    and mean rank (1 = best)."""
    wins, games, positions = defaultdict(float), defaultdict(int), defaultdict(list)
    for item in reviews.items.values():
        if item.kind != "rank":
            continue
        models = [m for _, m, _ in item.outputs]
        for row in reviews.rank_matrix(item)[1]:
            avg = rankdata(row)
            for m, r in zip(models, avg):
                positions[m].append(float(r))
            for i, j in combinations(range(len(models)), 2):
                if models[i] == models[j]:
                    continue
                games[models[i]] += 1
                games[models[j]] += 1
                wins[models[i]] += 1.0 if avg[i] < avg[j] else 0.5 if avg[i] == avg[j] else 0.0
                wins[models[j]] += 1.0 if avg[j] < avg[i] else 0.5 if avg[i] == avg[j] else 0.0
    return {m: {"win_rate": wins[m] / games[m] if games[m] else None, "mean_rank": _mean(positions[m])}
            for m in positions}


def _model_scores(reviews: Reviews) -> tuple[dict[str, dict], dict[int, list[dict]]]:
    """Per model: mean score per criterion and the weighted 0-100 score; per rubric item: each
    output's weighted score."""
    per_model: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    per_item = {}
    for item in reviews.items.values():
        if item.kind != "rubric":
            continue
        means = reviews.output_means(item)
        for oid, model, _ in item.outputs:
            for c, v in means.get(oid, {}).items():
                per_model[model][c].append(v)
        per_item[item.id] = [{"model": m, "score": reviews.weighted(means[o]) if o in means else None}
                             for o, m, _ in item.outputs]
    names = {c.id: c.name for c in reviews.criteria}
    out = {}
    for model, per in per_model.items():
        means = {c: float(np.mean(v)) for c, v in per.items()}
        out[model] = {"weighted_score": reviews.weighted(means), "criteria": {names[c]: v for c, v in means.items()}}
    return out, per_item


def _thumbs(reviews: Reviews) -> tuple[dict[str, float], dict[int, list[dict]], float | None]:
    """Per model: the share of its rated outputs' thumbs that were up; per rate item: each output's
    share; Krippendorff's alpha of the thumbs (units: the outputs of rate items; with two values
    the ordinal and the nominal alpha are the same)."""
    up, total, per_item, units = defaultdict(int), defaultdict(int), {}, []
    for item in (i for i in reviews.items.values() if i.kind == "rate"):
        votes = reviews.thumbs(item)
        for o, model, _ in item.outputs:
            up[model] += sum(votes.get(o, []))
            total[model] += len(votes.get(o, []))
            units.append((item, o))
        per_item[item.id] = [{"model": m, "score": _mean(votes.get(o, []))} for o, m, _ in item.outputs]
    matrix = {r: [None] * len(units) for r in sorted({reviews.by[a] for item, _ in units for a in item.done})}
    for u, (item, o) in enumerate(units):
        for a in item.done:
            if o in reviews.ratings.get(a, {}):
                matrix[reviews.by[a]][u] = int(reviews.ratings[a][o])
    alpha = agreement.ordinal_alpha(list(matrix.values()), (0, 1)) if matrix else None
    return {m: up[m] / total[m] for m in total if total[m]}, per_item, alpha


def _rank_agreement(reviews: Reviews) -> tuple[dict[int, dict], dict, dict[int, float]]:
    """Per rank item: Kendall's W and each output's mean rank; overall: mean W and pooled pairwise
    agreement; per reviewer: the share of their comparisons that disagree with another reviewer."""
    per_item, ws, agree, total = {}, [], 0, 0
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for item in reviews.items.values():
        if item.kind != "rank":
            continue
        raters, ranks = reviews.rank_matrix(item)
        w = agreement.kendalls_w(ranks)
        ws += [w] if w is not None else []
        a, t = agreement.pairwise_counts(ranks)
        agree, total = agree + a, total + t
        for r, (d, n) in zip(raters, agreement.rank_disagreement(ranks)):
            counts[r][0] += d
            counts[r][1] += n
        mean = consensus(ranks) if ranks else [None] * len(item.outputs)
        per_item[item.id] = {"agreement": w, "outputs": [{"model": m, "score": None if v is None else float(v)}
                                                         for (_, m, _), v in zip(item.outputs, mean)]}
    overall = {"kendall_w": _mean(ws), "rank_items_with_2plus": len(ws), "pairwise": agree / total if total else None}
    return per_item, overall, {r: d / n for r, (d, n) in counts.items() if n}


def _rubric_alpha_and_distance(reviews: Reviews) -> tuple[dict[str, float | None], dict[int, list[float]]]:
    """Krippendorff's ordinal alpha per criterion (units: the outputs of rubric items), and each
    reviewer's distances from the others' mean, as shares of the scale."""
    alphas, distance = {}, defaultdict(list)
    rubric = [i for i in reviews.items.values() if i.kind == "rubric"]
    units = [(item, o) for item in rubric for o, _, _ in item.outputs]
    raters = sorted({reviews.by[a] for item in rubric for a in item.done})
    for c in reviews.criteria:
        matrix = {r: [None] * len(units) for r in raters}
        for u, (item, o) in enumerate(units):
            scored = [(reviews.by[a], reviews.scores[a][(o, c.id)]) for a in item.done if (o, c.id) in reviews.scores.get(a, {})]
            for r, v in scored:
                matrix[r][u] = v
            for (r, _), d in zip(scored, agreement.score_deviation([v for _, v in scored])):
                distance[r].append(d / (c.scale_max - c.scale_min))
        alphas[c.name] = agreement.ordinal_alpha(list(matrix.values()), range(c.scale_min, c.scale_max + 1))
    return alphas, distance


def summarise(reviews: Reviews, reward: dict | None = None) -> dict:
    """Everything the report shows; `reward`: `reward_check.agreement`'s result, when a reward model was given."""
    ranked = _model_ranks(reviews)
    scored, rubric_items = _model_scores(reviews)
    thumbs_up, rate_items, thumbs_alpha = _thumbs(reviews)
    scores_of = {**rubric_items, **rate_items}
    alphas, rubric_distance = _rubric_alpha_and_distance(reviews)
    rank_items, rank_overall, rank_distance = _rank_agreement(reviews)
    items = [
        {"id": i.external_id, "kind": i.kind, "done": len(i.done), "needed": i.needed, "pending": i.pending,
         **(rank_items[i.id] if i.kind == "rank" else {"agreement": None, "outputs": scores_of[i.id]}),
         "comments": [f"{reviews.reviewer_names[r]}: {c}" for r, c in i.comments]}
        for i in reviews.items.values()
    ]
    names = reviews.reviewer_names
    rubric_dist = {names[r]: _mean(v) for r, v in rubric_distance.items()}
    rank_dist = {names[r]: v for r, v in rank_distance.items()}
    flagged = {"rubric": agreement.outliers(rubric_dist, RUBRIC_FLOOR), "rank": agreement.outliers(rank_dist, RANK_FLOOR)}
    done_by = Counter(reviews.by.values())
    reviewers = [
        {"name": name, "done": done_by[rid], "rubric_distance": rubric_dist.get(name),
         "rank_disagreement": rank_dist.get(name), "flagged": [k for k, who in flagged.items() if name in who]}
        for rid, name in sorted(names.items())
    ]
    models = sorted(set(ranked) | set(scored) | set(thumbs_up))
    return {
        "criteria": [{"name": c.name, "weight": c.weight, "scale": [c.scale_min, c.scale_max]} for c in reviews.criteria],
        "progress": {"done": sum(len(i.done) for i in reviews.items.values()),
                     "needed": sum(i.needed for i in reviews.items.values()),
                     "n_items": len(reviews.items)},
        "models": {m: {**ranked.get(m, {"win_rate": None, "mean_rank": None}),
                       **scored.get(m, {"weighted_score": None, "criteria": {}}),
                       "thumbs_up": thumbs_up.get(m)} for m in models},
        "agreement": {"rubric_alpha": alphas, **rank_overall, "thumbs_alpha": thumbs_alpha},
        "reviewers": reviewers,
        "items": items,
        "reward_model": reward,
    }


def format_summary(summary: dict) -> str:
    lines = [f"progress: {summary['progress']['done']}/{summary['progress']['needed']} reviews "
             f"on {summary['progress']['n_items']} items", "models:" if summary["models"] else "models: none reviewed yet"]
    for m, v in summary["models"].items():
        lines.append(f"  {m}: weighted rubric score {fmt(v['weighted_score'], '.1f')}/100, "
                     f"win rate {fmt(v['win_rate'])}, mean rank {fmt(v['mean_rank'], '.2f')}, thumbs up {fmt(v['thumbs_up'])}")
    ag = summary["agreement"]
    alphas = ", ".join(f"{k} {fmt(v)}" for k, v in ag["rubric_alpha"].items())
    lines.append(f"agreement: Krippendorff's alpha (ordinal) {alphas or 'n/a'}; "
                 f"Kendall's W {fmt(ag['kendall_w'])} (mean of {ag['rank_items_with_2plus']} items); "
                 f"pairwise {fmt(ag['pairwise'])}; thumbs alpha {fmt(ag['thumbs_alpha'])}")
    flagged = [f"{r['name']} ({', '.join(r['flagged'])})" for r in summary["reviewers"] if r["flagged"]]
    lines.append(f"outlying reviewers: {', '.join(flagged) or 'none'}")
    if rm := summary["reward_model"]:
        lines.append(f"reward model {rm['run']} vs held-out human rankings ({rm['items']} items, {rm['pairs']} pairs): "
                     f"pairwise accuracy {fmt(rm['accuracy'])} {_interval(rm['accuracy_ci95'])}, "
                     f"Kendall's tau {fmt(rm['kendall_tau'])} {_interval(rm['kendall_tau_ci95'])}")
    return "\n".join(lines)


def _interval(ci: list[float] | None) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "[n/a]"


def _bars(path: Path, title: str, ylabel: str, series: dict[str, dict[str, float | None]], red: set[str] = frozenset(),
          top: float | None = None) -> Path | None:
    """Grouped bar chart: series name -> {label: value}; labels in `red` are drawn red."""
    labels = sorted({k for s in series.values() for k, v in s.items() if v is not None})
    if not labels:
        return None
    fig = Figure(figsize=(max(5, 1.2 * len(labels) * len(series) ** 0.5 + 2), 3.6), dpi=100)
    ax = fig.subplots()
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        xs = np.arange(len(labels)) + (k - (len(series) - 1) / 2) * width
        bars = ax.bar(xs, [values.get(lb) or 0 for lb in labels], width, label=name)
        for bar, lb in zip(bars, labels):
            if lb in red:
                bar.set_color("#cf222e")
    ax.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, top)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _plots(summary: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    models = summary["models"]
    criteria = {"weighted": {m: v["weighted_score"] for m, v in models.items()}}
    for c in summary["criteria"]:
        lo, hi = c["scale"]
        criteria[c["name"]] = {m: None if v["criteria"].get(c["name"]) is None else 100 * (v["criteria"][c["name"]] - lo) / (hi - lo)
                               for m, v in models.items()}
    flagged = {r["name"] for r in summary["reviewers"] if r["flagged"]}
    made = [
        _bars(out / "rubric_scores.png", "Rubric scores by model (0-100)", "score", criteria, top=100),
        _bars(out / "win_rate.png", "Win rate in rankings", "share of comparisons won",
              {"win rate": {m: v["win_rate"] for m, v in models.items()}}, top=1),
        _bars(out / "reviewer_distance.png", "Reviewer distance from the others (red: flagged)", "distance",
              {"rubric (share of scale)": {r["name"]: r["rubric_distance"] for r in summary["reviewers"]},
               "ranking (share disagreeing)": {r["name"]: r["rank_disagreement"] for r in summary["reviewers"]}},
              red=flagged),
    ]
    return [p for p in made if p]


def write_report(store: Store, out_dir: Path, reward_model: str | None = None) -> tuple[Path, dict]:
    """out_dir/report.html (plots embedded) and out_dir/summary.json; returns (html path, summary).
    `reward_model`: a `tunelab reward` run to check against the rankings it was not trained on."""
    reviews = load(store)
    reward = None
    if reward_model is not None:
        from tunelab.review.reward_check import agreement as reward_agreement

        reward = reward_agreement(reviews, reward_model)
    summary = summarise(reviews, reward)
    plots = _plots(summary, out_dir / "plots")
    images = [(p.stem.replace("_", " "), base64.b64encode(p.read_bytes()).decode("ascii")) for p in plots]
    write_text(out_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    html = render("report.html", summary=summary, images=images)
    return write_text(out_dir / "report.html", html), summary
