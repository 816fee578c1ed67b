"""The one training loop every method runs on, with exact checkpoint/resume."""
