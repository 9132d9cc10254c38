"""The frontend process: the OpenAI-compatible HTTP API, templating, tokenizing and detokenizing."""
