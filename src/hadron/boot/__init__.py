"""Bootable artifacts and boots: disks, UKI, PCR 11 measurement, Secure Boot, GRUB, QEMU."""
