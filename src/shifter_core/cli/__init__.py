"""Command-line programs of Shifter (``shifterimg``)."""
