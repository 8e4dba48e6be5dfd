"""kvmesh agents."""
