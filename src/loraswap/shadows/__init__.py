"""Shadow versions: sampled requests answered again by another version, stored side by side."""
