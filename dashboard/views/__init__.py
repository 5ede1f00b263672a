"""One module per dashboard view (not named pages/: Streamlit would switch to its legacy multipage mode)."""
