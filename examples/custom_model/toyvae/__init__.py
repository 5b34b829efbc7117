"""A small encoder and decoder of your own for vaedist (`model.kind: custom`): see model.py."""
