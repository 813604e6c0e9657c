"""Datasets as token streams (memory-mapped), and the deterministic sampler the trainer uses."""

from lm.data.sampler import WindowSampler
from lm.data.streams import DataError, DataNotFound, TokenStream, load_stream

__all__ = ["DataError", "DataNotFound", "TokenStream", "load_stream", "WindowSampler"]
