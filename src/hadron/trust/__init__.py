"""What a user can check about a build: reproducibility under variation."""
