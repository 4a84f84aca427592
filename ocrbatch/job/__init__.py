"""The job's own stages, free of any engine: options, plan, render, units, encode."""
