"""The numeric core: formats, rounding kernels, ``quantize`` and packing into real
storage. It knows tensors and formats, never modules or training."""
