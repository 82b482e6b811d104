"""Archive: the ``.qlis`` file.

Its format and the checks every reader runs (format: needs neither torch nor the codecs),
the codecs that store quantized codes (codecs), writing and reading archives (file), packing a
checkpoint into one tensor by tensor (pack, with resume's cache of its first pass), and the
atomic writes of every file qlis produces (atomic).
"""
