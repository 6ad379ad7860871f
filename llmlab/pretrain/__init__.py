"""Pretraining methods that sit on the one training loop: progressive layer dropping, vocabulary extension."""
