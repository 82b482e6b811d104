"""qlis-iqa: CLIPIQA and DINOIQA image-quality models, trained, compressed with qlis and deployed.

The application of the paper "Towards Efficient Vision Transformers for Perceptual Quality
Assessment of Diffusion-Generated Images": a frozen (CLIP) or mostly frozen (DINO) ViT backbone
with a small MLP head, trained on AGIQA-1K/3K, then compressed layer by layer with `qlis`.
Needs the `iqa` extra (transformers, pillow, openpyxl, matplotlib, tqdm); `qlis` itself does not.
"""

from qlis_iqa.errors import IQAError, WeightsNotFoundError

__all__ = ["IQAError", "WeightsNotFoundError"]
