"""Deployment-wide endpoints: health, build info, metrics."""
