"""The ids of the string options, for every layer: the Python API takes the strings, the compiled (csrc/) and Triton
kernels take these ints. This module is a leaf (it imports nothing of zslfast, nor torch or triton), so the kernels
and the ops both take their ids from here: zslfast/ops/_spec.py converts an op's options on the way to its kernels,
zslfast/triton/ compares against these members, and csrc/enums.h copies them for the C++ kernels (the schemas in
csrc/ops.cpp name those structs; tests/test_spec.py checks that the copy agrees).

Each option is an ``IntEnum`` whose members are named after its values; :data:`ENUMS` maps the Python API's values
to them, in id order.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class Score(IntEnum):  # attribute_attention's epilogue
    NONE = 0
    DOT = 1
    COSINE = 2


class Policy(IntEnum):  # memory_bank_update
    FIFO = 0
    MIN_CONF = 1


class Mode(IntEnum):  # attention_rollout
    ABNAR = 0
    RESIDUAL = 1


class HeadFusion(IntEnum):  # attention_rollout
    MEAN = 0
    SUM = 1
    MAX = 2
    MIN = 3


class Normalize(IntEnum):  # attention_rollout's abnar: rows of F + I divided by their sums, or not
    ROW = 0
    NONE = 1


class EpsMode(IntEnum):  # cosine_logits
    CLAMP = 0
    ADD = 1


class SoftmaxOver(IntEnum):  # attribute_attention
    KEYS = 0
    QUERIES = 1
    NONE = 2  # no normalisation: P = S on the kept tokens


class LogitActivation(IntEnum):  # attribute_attention
    NONE = 0
    RELU = 1


class ReturnMax(IntEnum):  # attribute_attention
    NONE = 0
    ATTENTION = 1
    LOGITS = 2


class ReturnAttention(IntEnum):  # attribute_attention: which (B, K, R) map is returned, if any
    NONE = 0
    ATTENTION = 1
    LOGITS = 2


# Python API value -> id, per option name (the ops' argument names). ``None`` is an option's absence; the string
# "none" (attention_rollout's normalize) is a value of its own.
ENUMS: dict[str, dict[Any, IntEnum]] = {
    "score": {None: Score.NONE, "dot": Score.DOT, "cosine": Score.COSINE},
    "policy": {"fifo": Policy.FIFO, "min_conf": Policy.MIN_CONF},
    "mode": {"abnar": Mode.ABNAR, "residual": Mode.RESIDUAL},
    "head_fusion": {"mean": HeadFusion.MEAN, "sum": HeadFusion.SUM, "max": HeadFusion.MAX, "min": HeadFusion.MIN},
    "normalize": {"row": Normalize.ROW, "none": Normalize.NONE},
    "eps_mode": {"clamp": EpsMode.CLAMP, "add": EpsMode.ADD},
    "softmax_over": {"keys": SoftmaxOver.KEYS, "queries": SoftmaxOver.QUERIES, None: SoftmaxOver.NONE},
    "logit_activation": {None: LogitActivation.NONE, "relu": LogitActivation.RELU},
    "return_max": {None: ReturnMax.NONE, "attention": ReturnMax.ATTENTION, "logits": ReturnMax.LOGITS},
    "return_attention": {None: ReturnAttention.NONE, "attention": ReturnAttention.ATTENTION,
                         "logits": ReturnAttention.LOGITS},
}


def enum_id(kind: str, value) -> int:
    """The kernels' int for the Python API's ``value`` of option ``kind`` (already validated by the op)."""
    return int(ENUMS[kind][value])


def choices(kind: str) -> tuple:
    """The Python API's accepted values of option ``kind``, in id order."""
    return tuple(ENUMS[kind])
