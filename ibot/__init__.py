"""ibot: iBOT (Image BERT pre-training with Online Tokenizer) self-supervised ViT pretraining.

>>> from ibot import iBOT, DINO
"""

from ibot.methods import DINO, DINOOutput, ModelOutput, iBOT, iBOTOutput

__version__ = "0.1.0"
__all__ = ["DINO", "DINOOutput", "ModelOutput", "iBOT", "iBOTOutput", "__version__"]
