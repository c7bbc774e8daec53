"""Images: definitions, root filesystem assembly, OCI layout, the cached image build."""
