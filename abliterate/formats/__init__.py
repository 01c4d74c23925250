"""Every file format the pipeline reads and writes, each in exactly one module."""
