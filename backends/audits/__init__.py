"""Privacy audits the harness runs after a backend has trained: membership inference
(`membership`) and gradient inversion against federated updates (`gradient_inversion`)."""
