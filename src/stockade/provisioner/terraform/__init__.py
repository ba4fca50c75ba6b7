"""Running the Terraform or OpenTofu CLI for the terraform backend: finding
and checking the CLI, the per-build CLI configuration that installs providers
only from the offline mirror, and turning its JSON output into build logs."""
