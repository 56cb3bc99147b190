"""edge-parity: does a litert-torch re-authored LLM still behave like its HF original at every stage?"""

__version__ = "0.1.0"
