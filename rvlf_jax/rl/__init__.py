"""GRPO: rewards, advantage estimators and the policy loss, registered by name."""
