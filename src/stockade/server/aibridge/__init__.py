"""The AI bridge: OpenAI- and Anthropic-compatible access to internal model servers, recorded."""
