"""The Gradio demo's parts: documents (uploads), render (HTML), service (logic), ui (page + API)."""
