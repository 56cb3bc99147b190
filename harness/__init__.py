"""edge-parity: does a litert-torch re-authored LLM still behave like its HF original at every stage?"""

from harness.memory import use_huge_pages, use_system_allocator

__version__ = "0.1.0"

use_system_allocator()  # before any harness module imports TensorFlow
use_huge_pages()  # before any harness module imports torch
