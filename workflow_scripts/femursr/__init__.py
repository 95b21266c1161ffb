"""femursr: super-resolution of clinical CT of the proximal femur and bone microstructure evaluation."""

__version__ = "0.1.0"
