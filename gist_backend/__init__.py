"""GIST Curator backend: targeted instruction-data selection by gradient geometry."""
