"""RL rollouts through the paged engine, on the policy's current weights (no copy, no weight sync).

trl 1.16's RLOOTrainer generates in one method, `_generate_single_turn(prompt_ids, images,
multimodal_fields) -> completion ids per prompt` (prompt_ids already repeat each prompt
`num_generations` times); its vLLM path (`use_vllm`) and its transformers paths branch inside
it, and everything after (decoding, rewards, advantages, the loss) only sees the ids. So
`EngineRollouts` overrides that one method: mixed in before the trainer class, it sends the
prompts through a paged engine over the unwrapped policy, sampled with the trainer's own
temperature / top-p / top-k and a seed per completion drawn from torch's generator (so
`set_seed` keeps runs reproducible), completions ending at and including an EOS as trl's own
path leaves them. Where the engine cannot stand in — vLLM asked for, images, several processes
(FSDP/DeepSpeed shards), min_p or a repetition penalty, a non-Llama policy — trl's path runs.
"""

from __future__ import annotations

import torch

from tunelab.inference.base import SamplingParams


def rollouts(model, tokenizer, prompt_ids: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """One sampled completion per prompt from `model` as it is now."""
    from tunelab.inference.offline import generate_with

    return [c.token_ids for c in generate_with(model, tokenizer, prompt_ids, params)]


def engine_can_roll_out(trainer, images, multimodal_fields) -> bool:
    from tunelab.inference.runner import model_parts

    return not (trainer.use_vllm or images or multimodal_fields or trainer.accelerator.num_processes > 1
                or trainer.min_p or (trainer.repetition_penalty or 1.0) != 1.0
                or isinstance(model_parts(trainer.accelerator.unwrap_model(trainer.model)), str))


class EngineRollouts:
    """Mix in before trl's RLOOTrainer: `class TunelabRLOO(EngineRollouts, RLOOTrainer)`."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
        if not engine_can_roll_out(self, images, multimodal_fields):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields)
        return engine_completions(self, prompt_ids)


class GrpoEngineRollouts:
    """Mix in before trl's GRPOTrainer. Its `_generate_single_turn` also takes `num_generations`
    (used by its vLLM path only: the prompts arrive repeated already) and returns the sampled
    tokens' logprobs beside the ids, which only vLLM provides (None otherwise, as here)."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if getattr(self, "use_transformers_continuous_batching", False) or not engine_can_roll_out(
                self, images, multimodal_fields):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        return engine_completions(self, prompt_ids), None


def engine_completions(trainer, prompt_ids: list[list[int]]) -> list[list[int]]:
    """The trainer's sampling settings, a seed per completion from torch's generator."""
    seeds = torch.randint(0, 2**32 - 1, (len(prompt_ids),)).tolist()
    params = [SamplingParams(max_new_tokens=trainer.max_completion_length, temperature=trainer.temperature,
                             top_p=trainer.top_p if trainer.top_p is not None else 1.0, top_k=trainer.top_k or 0, seed=s)
              for s in seeds]
    return rollouts(trainer.accelerator.unwrap_model(trainer.model), trainer._tokenizer, prompt_ids, params)
