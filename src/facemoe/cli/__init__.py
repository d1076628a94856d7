"""Command-line apps: ``facemoe-export``, ``facemoe-run``, ``facemoe-bench`` and ``facemoe <command>``."""
