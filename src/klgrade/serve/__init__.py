"""HTTP service: FastAPI app with the grading API and a web page."""
