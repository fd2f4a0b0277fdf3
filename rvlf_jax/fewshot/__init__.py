"""Few-shot sign recognition with DVLA-RL: episodes, prototypes, RL-gated attention (RLA), gate
policies and the joint supervised + REINFORCE objective."""
