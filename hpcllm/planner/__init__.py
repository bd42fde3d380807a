"""`hpcllm plan`: a model of the training step (time and memory per rank), cluster profiles, and the
search over layouts that ranks them."""
