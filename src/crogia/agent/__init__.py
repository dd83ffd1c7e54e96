"""The LLM agent: a small loop on the official openai client, and the tools it is offered."""
