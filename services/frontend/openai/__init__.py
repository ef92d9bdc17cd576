"""OpenAI-compatible HTTP API of the frontend (FastAPI + uvicorn in the frontend's asyncio loop)."""
