"""Few-shot sign recognition with DVLA-RL: episodes, prototypes and the joint supervised +
REINFORCE objective (the RL-gated attention and its gates: `rvlf_jax.models.rla`, `.gates`)."""
