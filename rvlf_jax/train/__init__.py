"""Training: state, optimizers and one pure step function per stage."""
