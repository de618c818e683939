"""The meshid certificate authority and control plane."""
