"""Model-level helpers built on zslfast: explanations of backbones as they run.

    vit_attention_rollout(model, images, *, mode="abnar", head_fusion="mean", start_layer=0, cls_only=True)
        -> (model(images), rollout)   attention rollout of a timm VisionTransformer, folded in during the forward

timm is not imported here (nor by the helpers): they work on the model object they are given.
"""

from .rollout import vit_attention_rollout

__all__ = ["vit_attention_rollout"]
