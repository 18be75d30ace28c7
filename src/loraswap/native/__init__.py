"""Native endpoints: plain generate, SSE streaming, WebSocket and batched generation."""
