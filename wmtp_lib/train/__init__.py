"""The trainer and what it runs: weightings, the critic, rewards, reference losses, checkpoints, metrics (layer 5)."""
