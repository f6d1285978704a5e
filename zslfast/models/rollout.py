"""``zslfast.models.vit_attention_rollout``: kept here for code written against it; it lives in zslfast.nn.rollout
(the fold it uses: zslfast.ops.attention_rollout's RolloutFold)."""

from ..nn.rollout import vit_attention_rollout

__all__ = ["vit_attention_rollout"]
