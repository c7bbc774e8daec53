"""The engine: recipes → graph → fetch → sandbox → cache → scheduler."""
