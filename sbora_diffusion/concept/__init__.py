"""Single-concept training (DreamBooth with low-rank adapters): data, loss and the trainer on the engine."""
