"""Flatten image layers into one tar stream: :mod:`.twopass`."""
