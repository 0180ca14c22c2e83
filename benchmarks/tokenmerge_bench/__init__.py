"""The tokenmerge bench command's machinery: presets, loading, timing, fidelity, reports."""
