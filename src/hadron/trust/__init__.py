"""What lets a user check an image: its SBOM, its signed provenance and its signed manifest."""
