"""Model-level helpers built on zslfast: explanations of backbones as they run.

    vit_attention_rollout(model, images, *, mode="abnar", head_fusion="mean", start_layer=0, cls_only=True)
        -> (model(images), rollout)   attention rollout of a timm VisionTransformer, folded in during the forward
    ILPG(class_attributes, attribute_vectors, ...)
        forward(images | regions=, signatures=, labels=None) -> ILPGOutput(logits, loss, parts, attribute_scores)
    SVIPHead(class_attributes, backbone="deit_base_patch16_224", num_keep=0.8, ...)
        forward(images, labels=None) -> SVIPOutput(logits, loss, parts, patch_mask)   SVIP patch selection on a ViT
    SAGE(class_attributes, backbone="vit_base_patch16_224", attribute_word_embeddings=W, ...)
        forward(images | hidden_states=, labels=None) -> SAGEOutput(logits, loss, parts, attribute_scores, kl_active)
    load_checkpoint(model, path, strict=True) -> model
        a whole-model state dict (torch.save(model.state_dict(), path)) into model, all or nothing: checked first
        (keys, values, shapes, dtypes); the models' checkpoint= argument. Their pretrained= takes a local timm
        checkpoint path too (no hub).

timm is imported only when a model builds its backbones (ILPG(build_backbones=True), SVIPHead from a name, SAGE
from a name with build_backbone=True).
"""

from .ilpg import ILPG, ILPGOutput
from .rollout import vit_attention_rollout
from .sage import SAGE, SAGEOutput
from .svip import SVIPHead, SVIPOutput
from ._weights import load_checkpoint

__all__ = ["ILPG", "ILPGOutput", "vit_attention_rollout"]
__all__ += ["SVIPHead", "SVIPOutput"]
__all__ += ["SAGE", "SAGEOutput"]
__all__ += ["load_checkpoint"]
