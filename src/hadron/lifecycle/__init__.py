"""What happens to a system after its first boot: system extensions and whole-image updates."""
