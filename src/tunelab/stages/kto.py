"""`tunelab kto RECIPE`: learn from thumbs up/down (KTO, Ethayarajh et al. 2024) with trl's KTOTrainer.

KTO needs no pairs: each answer is only desirable or not (`tunelab review export --as ratings`:
the majority of its thumbs, or its rubric score against a threshold; or preference pairs, each
split into a desirable and an undesirable answer). Its loss compares the implicit reward
β·log(π/π_ref) of an answer with a reference point, the KL between policy and reference estimated
on mismatched prompt/answer pairs of the batch (so train.batch_size must be 2 or more, and the rows
are read in their seeded order). The two classes are weighted so that each weighs the same in all
unless preference.desirable_weight says otherwise (the paper keeps λ_D·n_D / λ_U·n_U in [1, 4/3]).
The reference is the starting model, as for DPO (`models.build.load_policy`).

Held-out metrics before and after, over every validation answer:

- `reward_auc`: the chance that a desirable answer's implicit reward beats an undesirable one's (a
  tie counts half, so 0.5 before training, when policy and reference agree); `reward_gap`: the mean
  implicit reward of desirable answers minus that of undesirable ones;
- `logp_auc`: the same chance for the policy's own mean per-token log-probability (meaningful
  before training too);
- the eval.metrics (ROUGE-L, …) of greedy generations against the desirable validation answers.
"""

from __future__ import annotations

from tunelab import lifecycle
from tunelab.config import Config
from tunelab.errors import TunelabError
from tunelab.lifecycle import Loaded, RunResult


def load(cfg: Config, sharded: bool = False) -> Loaded:
    from tunelab.data.preferences import load_ratings
    from tunelab.models.build import load_tokenizer
    from tunelab.models.loading import resolve

    tokenizer = load_tokenizer(resolve(cfg.model.name), cfg.model.chat_template)
    return Loaded(tokenizer, load_ratings(cfg, tokenizer))


def check(cfg: Config) -> None:
    """What kto needs beyond the schema, before any model loads."""
    if cfg.train.planned(cfg.data.max_length)[0] < 2:
        raise TunelabError("train.batch_size: KTO estimates its KL reference point from the other answers of a "
                           "batch; use 2 or more")


def build(cfg: Config, loaded: Loaded, args_for, callbacks):
    from trl import KTOConfig, KTOTrainer

    from tunelab.models.build import load_policy

    p, data = cfg.preference, loaded.data
    desirable = data.stats["train_desirable"]
    weight = p.desirable_weight or (len(data.train) - desirable) / desirable
    model, peft_config = load_policy(cfg, loaded.tokenizer)
    # sequential: KTO pairs each answer with its neighbour's prompt for the KL estimate (load_ratings shuffled once)
    args = args_for(KTOConfig, beta=p.beta, desirable_weight=weight, undesirable_weight=1.0,
                    max_length=cfg.data.max_length, train_sampling_strategy="sequential")
    return KTOTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval,
                      processing_class=loaded.tokenizer, callbacks=callbacks, peft_config=peft_config)


def measure(trainer, cfg: Config, loaded: Loaded, label: str) -> tuple[dict, list[dict]]:
    import torch

    from tunelab.evals.generation import generation_eval
    from tunelab.evals.pairs import pair_metrics
    from tunelab.evals.policy_logps import completion_labels, eval_logps

    labels = []

    def sides(batch):
        labels.append(batch["label"].bool().cpu())
        return [completion_labels(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])]

    logps = eval_logps(trainer, sides)
    good = torch.cat(labels)
    rewards = (cfg.preference.beta * (logps["policy"] - logps["reference"]))[0]
    mean_logp = (logps["policy"] / logps["tokens"].clamp(min=1))[0]

    def auc(values: torch.Tensor) -> float:  # every (desirable, undesirable) pair's difference, ties half
        return pair_metrics((values[good][:, None] - values[~good][None, :]).flatten())["accuracy"]

    metrics = {"reward_auc": auc(rewards), "reward_gap": (rewards[good].mean() - rewards[~good].mean()).item(),
               "logp_auc": auc(mean_logp)} if good.any() and (~good).any() else {}
    task, rows = generation_eval(
        trainer.model, trainer.processing_class, loaded.data.generation_rows(), cfg.eval.generation_samples,
        cfg.eval.metrics, cfg.eval.max_new_tokens, cfg.eval.batch_size, desc=f"generating ({label})",
    )
    return {**metrics, **task}, rows


STAGE = lifecycle.Stage(
    name="kto",
    load=load,
    build=build,
    measure=measure,
    perplexity=False,
    curves={
        "rewards": ("Implicit rewards", {"rewards/chosen": "desirable", "rewards/rejected": "undesirable",
                                         "eval_rewards/chosen": "desirable (validation)",
                                         "eval_rewards/rejected": "undesirable (validation)"}),
        "kl": ("KL reference point", {"kl": "train", "eval_kl": "validation"}),
    },
)


def run(cfg: Config) -> RunResult:
    check(cfg)
    return lifecycle.run(cfg, STAGE)
