"""The router's OpenAI-compatible HTTP front (FastAPI on uvicorn): see router.http.app."""
