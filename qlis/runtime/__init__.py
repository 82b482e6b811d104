"""Runtime: running an archive's layers packed (lowbit), from the grids its quantizers
describe, instead of loading them as float."""
