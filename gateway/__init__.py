"""LLM gateway with cost accounting."""
