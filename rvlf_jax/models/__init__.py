"""Pure-functional flax.linen modules: layers, attention, decoders, vision encoder."""
