"""Model families (family.py: what one is; registry.py: which exist), each network written once for
training and decoding; partition.py cuts any of them for tensor parallelism by the family's plan."""
