"""Command-line entry points (absl flags) shared by the experiment scripts."""
