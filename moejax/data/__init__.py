"""Data sources behind one interface: fixed-shape, deterministic numpy batches.

Axis legend:
  B  batch
  S  sequence length
  H, W, C  image height, width, channels

``get_lm_data("stdlib" | "text:GLOB" | "tfds:NAME", seq_len=S, batch_size=B)``
returns `LMData` (byte tokens, ``batch(i)`` -> inputs/targets int32[B, S], mask
float32[B, S]); ``get_image_data("digits" | "tfds:mnist" | ..., batch_size=B)``
returns `ImageData` (``batch(i)`` -> images float32[B, H, W, C], labels int32[B]).
``batch(i)`` is a pure function of (data, seed, i): the data position of a run is
the next batch index. Missing data raises `DataError` saying what to do.
``load_tokenizer("bytes" | "x.model" | "x.json")`` gives a `Tokenizer`
(`moejax.data.tokenizers`).
"""

from moejax.data.base import DataError, LMData, decode, encode
from moejax.data.images import ImageData
from moejax.data.registry import get_image_data, get_lm_data
from moejax.data.tokenizers import Tokenizer, load_tokenizer

__all__ = ["DataError", "ImageData", "LMData", "Tokenizer", "decode", "encode",
           "get_image_data", "get_lm_data", "load_tokenizer"]
