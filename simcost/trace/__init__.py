"""The traced front end: one eager training step recorded by torch (needs the torch extra)."""
