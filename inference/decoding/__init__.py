"""The decoding engine: models and their 2-bit twins, the decoding loop, its step paths and kernels."""
