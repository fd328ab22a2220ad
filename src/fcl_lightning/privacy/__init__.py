"""Opt-in differential privacy for what leaves a client (``federation.privacy``): the Gaussian
mechanism on the exchanged vectors and on the weight updates (``mechanism``), the privacy loss of a
run from Google's ``dp-accounting`` library (``accountant``) and the config section (``config``).
The threat model is in the README ("What leaves a hospital")."""

from fcl_lightning.privacy.config import Privacy

__all__ = ["Privacy"]
