"""The pipeline's commands: one thin module per DVC stage or command (``abliterate --help``)."""
