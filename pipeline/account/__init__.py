"""What a run used and spent: tokens, requests and latency (`usage`), prices and the budget
(`cost`)."""
