"""Images as tokens: discrete autoencoders (VQ-VAE with an EMA codebook, FSQ), the frames they learn
from, and the observation tokenizer they become.

    quantizers.py   EMAQuantizer (nearest code, EMA updates, dead-code restarts, commitment), FSQuantizer
    autoencoder.py  ImageAutoencoder: conv encoder -> quantiser -> conv decoder; encode / decode
    frames.py       collect_frames (random play in a pixel environment), compressed .npz in the run folder
    tokenizer.py    ImageTokenizer: the observation-tokenizer protocol over "pixels" (kind "image")
    cells.py        CellReader: MiniGrid cells read back from pixels (the cell-accuracy checker)
    evaluate.py     `worldloom eval` of a tokenizer run

The recipe that trains one is ``worldloom.recipes.image_tokenizer`` (`worldloom train tokenizer-vq`).
"""

from .autoencoder import ImageAutoencoder, VisionOutput
from .quantizers import EMAQuantizer, FSQuantizer
from .tokenizer import ImageTokenizer

__all__ = ["EMAQuantizer", "FSQuantizer", "ImageAutoencoder", "ImageTokenizer", "VisionOutput"]
