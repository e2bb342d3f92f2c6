"""Load benchmark: kernel NAT vs redsocks vs transocks in a namespace lab (bench/README.md)."""
