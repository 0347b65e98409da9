"""`zipserve serve --prefill-group N --prefill-group-min-tokens M --prefill-group-exchange E`:
validation at start-up and the routing rule (prompts of at least M tokens go to the group, the
rest to prefill workers)."""

from __future__ import annotations

from dataclasses import dataclass

from zipserve.engine.loading import model_config_for
from zipserve.prefill_group.plan import UnsupportedSplit, plan_heads

EXCHANGES = ("lowrank", "full")
"""What the all-to-alls carry with a lowrank codec: the projected Q/K/V (ZeroC: half the bytes or
less, but every prompt token then attends in the reduced space) or the full ones (exact)."""


@dataclass(frozen=True)
class GroupConfig:
    size: int
    """Workers in the group (0: no group)."""
    min_tokens: int
    """Prompts of at least this many tokens are prefilled by the group."""
    exchange: str = "lowrank"
    """One of EXCHANGES; only a lowrank codec has a reduced exchange."""

    @property
    def lowrank_exchange(self) -> bool:
        return self.exchange == "lowrank"

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def use_group(self, num_prompt_tokens: int) -> bool:
        """The routing rule the backend applies per request."""
        return self.enabled and num_prompt_tokens >= self.min_tokens


def validate_group(
    model: str, size: int, min_tokens: int, page_size: int = 64, exchange: str = "lowrank"
) -> GroupConfig:
    """Raises ValueError naming the flag and the numbers for anything the group cannot run."""
    if exchange not in EXCHANGES:
        raise ValueError(
            f"--prefill-group-exchange: must be one of {', '.join(EXCHANGES)}, got {exchange!r}"
        )
    if size == 0:
        return GroupConfig(0, min_tokens, exchange)
    if size < 2:
        raise ValueError(
            f"--prefill-group: a group needs at least 2 workers (0 turns it off), got {size}"
        )
    if min_tokens < size * page_size:
        raise ValueError(
            f"--prefill-group-min-tokens: must be at least {size * page_size} "
            f"({size} workers x page size {page_size}: every worker needs a whole "
            f"page), got {min_tokens}"
        )
    cfg = model_config_for(model)
    if getattr(cfg, "lckv", None) is not None:
        raise ValueError(
            "--prefill-group: layer-condensed (LCKV) checkpoints are not supported "
            "by sequence-parallel prefill"
        )
    try:
        plan_heads(cfg.num_heads, cfg.num_kv_heads, size)
    except UnsupportedSplit as e:
        raise ValueError(f"--prefill-group: {e}") from None
    if min_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"--prefill-group-min-tokens: {min_tokens} is beyond the model's "
            f"{cfg.max_position_embeddings} positions: no prompt would use the group"
        )
    return GroupConfig(size, min_tokens, exchange)
