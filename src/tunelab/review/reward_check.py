"""The reward model against the people, for `tunelab review report --reward-model RUN`.

On the rank items the reward run did not train on (its `train_prompts.json` names the prompts it
saw; without one every rank item counts, and the result says so), the model scores each output,
and its order is compared with every reviewer's: pairwise accuracy over the pairs a reviewer
ordered, and Kendall's τ-b (`evals/ranking.py`), each with a 95% percentile-bootstrap interval
over items (`evals/stats.py`: items are the independent units; the rankings of one item are not).
"""

from __future__ import annotations

from tunelab.review.aggregate import Reviews


def agreement(reviews: Reviews, run: str, batch_size: int = 8) -> dict:
    from tunelab.data.feedback import prompt_key, trained_prompts
    from tunelab.evals.ranking import ranking_agreement
    from tunelab.evals.reward_scores import score_outputs
    from tunelab.evals.stats import mean_interval
    from tunelab.models.reward_model import load_reward_model

    trained = trained_prompts(run)
    ranked = [(item, reviews.rank_matrix(item)[1]) for item in reviews.items.values() if item.kind == "rank"]
    ranked = [(item, ranks) for item, ranks in ranked if ranks]
    held_out = [(item, ranks) for item, ranks in ranked if trained is None or prompt_key(item.prompt) not in trained]
    result = {"run": run, "items": len(held_out), "trained_items_skipped": len(ranked) - len(held_out),
              "held_out_known": trained is not None, "pairs": 0, "accuracy": None, "accuracy_ci95": None,
              "kendall_tau": None, "kendall_tau_ci95": None}
    if not held_out:
        return result
    model, tokenizer = load_reward_model(run)
    scores = score_outputs(model, tokenizer, [(item.prompt, [t for _, _, t in item.outputs]) for item, _ in held_out],
                           batch_size)
    found = ranking_agreement(scores, [ranks for _, ranks in held_out])
    per_item = [i for i in found["items"] if i["pairs"]]
    with_tau = [i for i in found["items"] if i["taus"]]
    result.update(pairs=found["pairs"], accuracy=found["accuracy"], kendall_tau=found["kendall_tau"])
    if per_item:
        result["accuracy_ci95"] = mean_interval([i["right"] / i["pairs"] for i in per_item], [i["pairs"] for i in per_item])
    if with_tau:
        result["kendall_tau_ci95"] = mean_interval([sum(i["taus"]) / len(i["taus"]) for i in with_tau],
                                                   [len(i["taus"]) for i in with_tau])
    return result
