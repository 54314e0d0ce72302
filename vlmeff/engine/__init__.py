"""Engines apply a method (scorer + selector + reducer) at the sites an adapter exposes."""
