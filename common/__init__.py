"""What every process of the fleet shares, and nothing else (common/README.md has the rooms' rules)."""
