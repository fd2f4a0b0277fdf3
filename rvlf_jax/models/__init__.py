"""Pure-functional flax.linen modules: layers, attention, decoders, DINOv2, sign encoders, SLT."""
