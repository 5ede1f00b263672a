"""GIST Curator dashboard: thin Streamlit pages over ``gist_backend``."""
