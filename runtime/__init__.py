"""kvmesh runtime."""
