"""qconv: convert a language model into verified, recorded, shippable quantized artifacts."""

__version__ = "0.1.0"
