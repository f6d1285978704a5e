"""nn.Module wrappers over the ops, drop-in for ZSL code. Each has a ``backend`` attribute (None: fused ops by
device; "reference": plain PyTorch) that zslfast.models' ``set_backend`` switches."""

from .classifier import CosineClassifier
from .memory_bank import MemoryBank, MemoryBankGuidedFusion
from .prototype import InstancePrototypeClassifier
from .rollout import AttentionRollout, vit_attention_rollout
from .attention import AttributeCrossAttention
