"""Templates: versioned, immutable template archives and their manifests."""
