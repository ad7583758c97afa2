"""Thin adapters to other tools; each imports its optional dependency only when used."""
