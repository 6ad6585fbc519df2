"""Simulation: gradient-flow analysis, memory model, time model, training estimate."""
