"""Validation against torch: exact checks (FLOPs, parameters, saved activations) and, with a
time model, measured steps. Needs the ``torch`` extra; nothing here is imported by the core."""
