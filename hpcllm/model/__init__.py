"""The GPT (gpt.py), written once; partition.py cuts it for tensor parallelism, and a pipeline
stage keeps its own layers of it."""
