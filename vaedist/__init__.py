"""vaedist: distributed batch training and evaluation of variational autoencoders on Ray."""

__version__ = "0.1.0"
