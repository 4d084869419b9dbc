"""The Triton deployer."""
