"""What lets a user check an image: its SBOM, its signed provenance and its signed manifest, and
that a rebuild on another machine gives the same bytes."""
