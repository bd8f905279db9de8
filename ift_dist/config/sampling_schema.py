"""train.sampling: how the answers to the sample prompts are decoded during training (ift_dist/sample_prompts.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ift_dist.config.checks import ConfigError, check_positive


@dataclass
class SamplingOptions:
    """Greedy by default; with temperature > 0 sampled, reproducibly: each prompt's draws come from its own generator
    seeded by (seed, prompt), so every rank draws the same tokens and training's random state is untouched."""

    # 0 = greedy (the other options but repetition_penalty and max_new_tokens then have no effect); > 0 divides the
    # logits before sampling (0.7 is a common choice).
    temperature: float = 0.0
    # Nucleus sampling: keep the most likely tokens whose probabilities sum to top_p, in (0, 1]; 1 = off.
    top_p: float = 1.0
    # Keep the top_k most likely tokens; 0 = off.
    top_k: int = 0
    # CTRL's penalty on tokens already in the prompt or answer (> 1 discourages repeats); 1 = off.
    repetition_penalty: float = 1.0
    # Most new tokens of each answer; null = train.sample_max_new_tokens.
    max_new_tokens: int | None = None
    # With the prompt (its file and id) seeds the prompt's own generator: the same seed gives the same answers.
    seed: int = 1234

    def validate(self, key: str) -> None:
        check_positive(f"{key}.temperature", self.temperature, allow_zero=True)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{key}.top_p: must be in (0, 1], got {self.top_p!r}")
        check_positive(f"{key}.top_k", self.top_k, allow_zero=True)
        check_positive(f"{key}.repetition_penalty", self.repetition_penalty)
        if self.max_new_tokens is not None:
            check_positive(f"{key}.max_new_tokens", self.max_new_tokens)
