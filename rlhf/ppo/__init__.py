"""PPO for RLHF: the algorithm's math lives in `rlhf.ppo.core` (pure torch, no models or trainers)."""
