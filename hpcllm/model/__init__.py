"""The GPT model (gpt.py); tensor- and pipeline-parallel runs partition this same model."""
