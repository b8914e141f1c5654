"""HD-PiSSA: per-data-parallel-rank orthogonal slices of the principal singular components."""
