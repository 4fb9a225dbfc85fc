"""The gateway: routes OpenAI requests across engine endpoints (never imports torch)."""
